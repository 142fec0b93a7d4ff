"""All collectives live here: ``Dist`` (rank, gather-with-grad, ring step, local-loss labels).

Models and objectives never import ``torch.distributed``; they take a ``Dist``::

    dist = Dist.current()                      # 1-worker Dist when no process group exists
    texts = dist.all_gather(text_embeds)       # (W*B, D), exact gradients
    labels = dist.offsets(image_embeds.shape[0])
"""

from vlmray.distributed.dist import Dist
from vlmray.distributed.gather import (
    all_gather_no_grad,
    all_gather_with_grad,
    neighbour_exchange_with_grad,
)

__all__ = ["Dist", "all_gather_no_grad", "all_gather_with_grad", "neighbour_exchange_with_grad"]
