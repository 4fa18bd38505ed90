"""Pure torch + pydantic, no I/O (no file opened, no environment read: ``tests/test_layout.py`` walks the code):
the config schemas (``config``), typed records that cross layers (``records``), the head registry (``heads/``),
training (``training``, ``device``), missing patterns (``patterns``), feature transforms (``features``),
metrics, LoRA, search spaces and the papers' constants a run's deviations are named against (``paper``). Imports
nothing else of this project."""
