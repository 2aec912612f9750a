"""rerule: a Triton-accelerated training core for reinforcement unlearning (RULE / ReRULE)."""

from rerule.fused_linear import fused_linear_grpo_loss
from rerule.loss import GRPOLossOutput, group_advantages, grpo_loss, token_logps
from rerule.version import __version__

__all__ = ["GRPOLossOutput", "__version__", "fused_linear_grpo_loss", "group_advantages", "grpo_loss", "token_logps"]
