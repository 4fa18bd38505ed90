"""The only package that talks to MLflow: runs, registry and champions (``runs``), what a run read
(``lineage``), parent/child runs and table runs (``studies``), and the registered model's format (``pyfunc``) with
its runtime (``predictor``, which needs no MLflow). Imports ``models`` and the other ``stores`` packages."""
