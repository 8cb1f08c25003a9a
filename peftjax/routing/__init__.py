"""Routers over adapters: task-conditioned mixing in weight space (Poly, MHR) and token-level
mixing in activation space (MoLoRA, SMoRA, AdapterFusion, Arrow).

Every router records the weights it applied (`peftjax.routing.record`), so analysis code reads
them from a forward pass without changing the model.
"""

from peftjax.routing.record import (
    AuxLoss,
    RoutingWeights,
    add_aux_loss,
    capture,
    entropy,
    record_weights,
)

__all__ = ["AuxLoss", "RoutingWeights", "add_aux_loss", "capture", "entropy", "record_weights"]
