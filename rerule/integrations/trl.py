"""TRL integration, one import: ``FusedGRPOTrainer`` (TRL's ``GRPOTrainer`` with the fused-linear GRPO
loss, ``trl_fused.py``) and ``ReplayGRPOTrainer`` / ``ReplayGRPOConfig`` (ReRULE's replay on top of it,
``trl_replay.py``).

    from rerule.integrations.trl import FusedGRPOTrainer, ReplayGRPOConfig, ReplayGRPOTrainer
"""

from rerule.integrations.trl_fused import FusedGRPOTrainer, install_head_hook, logit_scale_of
from rerule.integrations.trl_replay import ReplayGRPOConfig, ReplayGRPOTrainer

__all__ = ["FusedGRPOTrainer", "ReplayGRPOConfig", "ReplayGRPOTrainer", "install_head_hook", "logit_scale_of"]
