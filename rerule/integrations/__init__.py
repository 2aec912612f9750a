"""Drop-in adapters that put rerule's fused GRPO loss (and ReRULE's replay) inside other trainers.

- ``rerule.integrations.trl``: ``FusedGRPOTrainer`` and ``ReplayGRPOTrainer`` (subclasses of TRL's
  ``GRPOTrainer``; needs ``pip install rerule[trl]``).
- ``rerule.integrations.verl``: ``compute_policy_loss`` (verl's policy-loss signature) and
  ``register_with_verl()``.
- ``rerule.integrations.openrlhf``: ``PolicyLoss``, an ``nn.Module`` with OpenRLHF's interface.

Each submodule is imported on its own, so ``import rerule.integrations`` pulls in none of the
frameworks. Parity with each framework's own loss is what the tests in ``tests/integrations/``
check; the README's "Using rerule inside TRL / verl / OpenRLHF" shows how to use each one.
"""
