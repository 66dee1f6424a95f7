"""run.json model configs stay readable across versions."""

import dataclasses

from jaxalign import checkpoint
from jaxalign.models.config import preset


def test_model_config_round_trip_ignores_unknown_fields():
  cfg = preset("tiny", rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                            ("original_max_position_embeddings", 8192), ("rope_type", "llama3")), layer_types=("full_attention",) * 2)
  d = dataclasses.asdict(cfg)
  d = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}, "attention_block": 128}
  assert checkpoint.model_config_from_dict(d) == cfg
