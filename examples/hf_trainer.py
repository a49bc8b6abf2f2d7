"""batchscope in a Hugging Face Trainer run: one callback (pip install 'batchscope[hf]').

    python examples/hf_trainer.py --db runs.duckdb --accum 2 --unit tokens

A tiny Llama built from a config (nothing is downloaded) learns token sequences drawn from a random
Markov chain. The callback logs every optimizer step with its noise-scale ingredients on the unclipped
gradient (it measures, then clips with the Trainer's max_grad_norm itself), the evaluations, and ends
the run; `with callback:` also fails the run if training raises.
"""

import argparse

import torch
import transformers

from trainer.integrations.hf import BatchscopeCallback

p = argparse.ArgumentParser()
p.add_argument("--db", default="runs.duckdb")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
p.add_argument("--accum", type=int, default=2)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--unit", choices=["examples", "tokens"], default="tokens")
p.add_argument("--out", default="hf-out", help="the Trainer's output_dir (nothing is saved there)")
args = p.parse_args()
VOCAB, T = 32, 16

chain = torch.randint(0, VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(0))


def sequences(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tok = torch.empty(n, T, dtype=torch.long)
    tok[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, T):
        tok[:, t] = chain[tok[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s.clone()} for s in tok]


torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=T))
training = transformers.TrainingArguments(
    output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
    max_steps=args.steps, learning_rate=args.lr, max_grad_norm=1.0, eval_strategy="steps", eval_steps=20,
    logging_steps=20, save_strategy="no", report_to="none", seed=0, disable_tqdm=True)
callback = BatchscopeCallback(db=args.db, name=f"llama-b{args.batch * args.accum}", sweep="examples",
                              task="markov", unit=args.unit)
trainer = transformers.Trainer(model=model, args=training, train_dataset=sequences(4096, 1),
                               eval_dataset=sequences(256, 2), callbacks=[callback])
with callback:
    trainer.train()
print(f"{trainer.state.global_step} steps logged to {args.db}")
