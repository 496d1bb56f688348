"""MuSu's model zoo, mirroring ``detectron2.model_zoo``; importing it registers ``musu://``.

``get_config_file`` / ``get_config`` / ``get_checkpoint_url`` / ``get`` take a config path
relative to ``configs/`` (shipped inside the package); ``load_model(cfg, weights)`` builds and
loads any config's model and ``Predictor(cfg)`` is Detectron2's ``DefaultPredictor``, both reading
weights without running code from the file. The published models are listed in ``models.json``
(:mod:`.table`). ``MODEL.WEIGHTS musu://<name>`` works wherever Detectron2's ``PathManager``
resolves paths (``DetectionCheckpointer``, ``train_net.py --eval-only``): downloads are cached
and verified (:mod:`.file_io`).
"""

from detectron2.utils.file_io import PathManager

from .file_io import (
    DEFAULT_MODEL_ZOO_URL,
    ENV_MODEL_ZOO_URL,
    ChecksumMismatchError,
    ModelZooError,
    MuSuModelZooHandler,
    cache_dir,
    load_checkpoint,
    model_zoo_url,
)
from .model_zoo import (
    Predictor,
    WeightsOnlyCheckpointer,
    get,
    get_checkpoint_url,
    get_config,
    get_config_file,
    list_configs,
    load_model,
)
from .table import MODEL_ZOO_FILES, TABLE_FILE, ModelZooEntry, configs_root

PathManager.register_handler(MuSuModelZooHandler())

__all__ = [
    "DEFAULT_MODEL_ZOO_URL",
    "ENV_MODEL_ZOO_URL",
    "MODEL_ZOO_FILES",
    "ChecksumMismatchError",
    "ModelZooEntry",
    "ModelZooError",
    "MuSuModelZooHandler",
    "Predictor",
    "TABLE_FILE",
    "WeightsOnlyCheckpointer",
    "cache_dir",
    "configs_root",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
    "load_checkpoint",
    "load_model",
    "model_zoo_url",
]
