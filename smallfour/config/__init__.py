"""Model configuration: the hyperparameters, and the released formats that hold them.

    model.py          TextConfig, RopeConfig, VisionConfig, ConfigError (the architecture)
    fields.py         the field-table machinery: Key / Fixed, the read and write walks
    text_fields.py    where each TextConfig field sits in config.json and params.json
    vision_fields.py  the same for VisionConfig
    formats.py        from_hf / to_hf, from_params / to_params, from_hub
    files.py          a directory's config (ours, config.json, params.json, both)

The names of `model.py` are re-exported here: `from smallfour.config import TextConfig`.
"""

from smallfour.config.model import (IMAGE_PROCESSORS, SMALLFOUR_CONFIG_FILE,
                                    SOFTMAX_SCALE_MODES, ConfigError, ImageProcessor,
                                    RopeConfig, SoftmaxScaleMode, TextConfig, VisionConfig,
                                    yarn_mscale)

__all__ = ["IMAGE_PROCESSORS", "SMALLFOUR_CONFIG_FILE", "SOFTMAX_SCALE_MODES", "ConfigError",
           "ImageProcessor", "RopeConfig", "SoftmaxScaleMode", "TextConfig", "VisionConfig",
           "yarn_mscale"]
