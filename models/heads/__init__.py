"""Head registry. Importing this package registers every built-in head; a new head is one module here."""
from . import cmpt, fusion, mmp, srmm  # noqa: F401  (registration side effects)
from . import oracle  # noqa: F401
from .base import (HEADS, FeatureBatch, Head, HeadConfig, HeadOutput, ModalitySpec, build_head,  # noqa: F401
                   parse_head_config)
