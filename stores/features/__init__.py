"""The LanceDB feature store: feature views per (modality, encoder), the dataset table, each config's search table
(``feature_store``, ``views``), the decoded split cache (``split_cache``), saved presence masks (``masks``) and the
splits as a head sees them under a missing pattern (``scenarios``), what a folder and an object-store URI differ in
(``location``), typed filter clauses (``filters``), DVC versioning (``versioning``) and store administration
(``admin``: info, gc). Imports ``models`` only."""
