"""One run's logic, without Prefect: train and evaluate a head (``train``), reproduce a logged run (``reproduce``),
tune heads on an equal budget (``tune``), comparison tables and sweep reports (``reporting``, ``gap``). Imports
``models`` and ``stores``; ``tasks`` wrap it."""
