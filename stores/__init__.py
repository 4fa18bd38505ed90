"""Every backing service and file format, one sub-package per role; imports ``models`` only (never ``runs``,
``tasks`` or ``flows``). With ``models`` it is the library a registered model ships.

- ``config_files``: YAML experiment files, ``extends:``, ``--set`` overrides
- ``datasets/``: dataset adapters (bundled datasets, users' manifests) into one manifest schema
- ``encoders/``: the frozen pretrained encoders
- ``features/``: the LanceDB feature store (views, dataset and search tables, split cache, masks, locations,
  filters, DVC versioning, admin)
- ``extraction/``: encoding sources into the feature store (local threads, Ray Data), migration of old stores
- ``tracking/``: MLflow (runs, registry, lineage, studies) and the registered model's format and runtime
- ``ray_cluster``, ``health``, ``progress``: a Ray cluster's settings, service health waits, progress files"""
