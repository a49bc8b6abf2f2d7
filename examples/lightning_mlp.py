"""batchscope in a PyTorch Lightning fit: one callback (pip install 'batchscope[lightning]').

    python examples/lightning_mlp.py --db runs.duckdb --accum 2

The callback starts the run with what it can infer (lr, optimizer, batch size x accumulation x world
size, seed, device), logs every optimizer step with its noise-scale ingredients (taken before Lightning
clips), logs val_loss / val_acc as split "test", and ends the run finished, or failed with the exception.
"""

import argparse
import warnings

import lightning.pytorch as L
import torch
from torch import nn

from trainer.integrations.lightning import BatchscopeCallback

p = argparse.ArgumentParser()
p.add_argument("--db", default="runs.duckdb")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--batch", type=int, default=32, help="examples per micro-batch")
p.add_argument("--accum", type=int, default=1)
p.add_argument("--lr", type=float, default=0.1)
args = p.parse_args()


class Classifier(L.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


L.seed_everything(0, verbose=False)
teacher = nn.Linear(20, 4)
x = torch.randn(4096, 20)
with torch.no_grad():
    y = torch.distributions.Categorical(logits=2 * teacher(x)).sample()
data = torch.utils.data.TensorDataset(x[:3584], y[:3584])
train = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True)
val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[3584:], y[3584:]), batch_size=512)

callback = BatchscopeCallback(db=args.db, name=f"lightning-b{args.batch * args.accum}", sweep="examples",
                              task="teacher")
trainer = L.Trainer(max_steps=args.steps, accumulate_grad_batches=args.accum, gradient_clip_val=1.0,
                    val_check_interval=25 * args.accum, callbacks=[callback], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    trainer.fit(Classifier(args.lr), train, val)
print(f"{trainer.global_step} steps logged to {args.db}")
