"""HF Trainer integration for adapters trained together (model/together.py): a collator that carries each
example's adapter into the batch.

    with Together(model, ["alice", "bob"]) as together:
        trainer = Trainer(model=model, args=..., train_dataset=rows,          # each row: {..., "adapter": "bob"}
                          data_collator=AdapterIdsCollator(),
                          optimizers=(RowsAdamW(together.banks().values(), lrs), None))
        trainer.train()

The batch's `adapter_ids` reach SigmaModel.forward, which routes every row through its own adapter. With the
Trainer's own AdamW all adapters share one learning rate; RowsAdamW gives each its own. The Trainer's loss is
the mean over the whole mixed batch and max_grad_norm clips all adapters together; together_loop.py (what
`sigmatune train --lr a,b,c` runs) gives each adapter its own rows' mean loss and its own clip.
"""

from __future__ import annotations

import torch
from transformers import default_data_collator


class AdapterIdsCollator:
    """Collate examples with an adapter field (a name of the Together block, or its index) by `collator`
    (default: transformers' default_data_collator), and put the adapters in the batch as adapter_ids."""

    def __init__(self, collator=None, field: str = "adapter"):
        self.collator, self.field = collator or default_data_collator, field

    def __call__(self, features: list[dict]) -> dict:
        if any(self.field not in f for f in features):
            raise KeyError(
                f"every example needs its {self.field!r} (an adapter's name or index) to train together"
            )
        adapters = [f[self.field] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.field} for f in features])
        batch["adapter_ids"] = adapters if isinstance(adapters[0], str) else torch.tensor(adapters)
        return batch
