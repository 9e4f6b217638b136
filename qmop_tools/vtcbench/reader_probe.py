"""Reader probe: can the LLM learn a question dimension from the frozen tower's tokens at all?

The full benchmark trains every variant in two stages and generates answers, an hour or more on CPU. Before spending
that, this probe asks the two questions the chain depends on, in minutes:

- does the tower's feature layer hold the fact (a dimension at chance here is at chance in every variant)?
- can an LLM of the benchmark's size read it from M pooled tokens, or from all 576?

It caches the feature layer's patch tokens once per split (the tower is frozen), reduces them to `tokens` (`pool36`:
average pooling to 6 x 6, the pooling branch without its MLP; `full`: all 576), and trains a two-layer MLP projector
and the pre-trained LLM on `<s> [visual tokens] \\nUSER: question ASSISTANT:` -> the answer's single token,
with cross-entropy on that token only. Accuracy is the argmax over the whole vocabulary on the validation split, per
dimension, every `eval_every` steps. No router, no generation, no stage 1: an upper-bound reader, not a variant.

    qmop reader-probe --output outputs/vtcbench --tokens pool36 --steps 1500
"""

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REDUCTIONS = ("pool36", "full")


@dataclass
class ProbeSettings:
    tokens: str = "pool36"  # REDUCTIONS
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    eval_every: int = 250
    seed: int = 0
    # Train and score only these dimensions (comma-separated, e.g. "spatial"); empty = all five. One dimension alone
    # tells whether the LLM can learn it at all, apart from how many of its questions a mixed schedule gives it.
    dimensions: str = ""
    # How many times each question of a dimension appears per pass over the train split, e.g. "counting=3" (others
    # 1): the benchmark's `Settings.stage2_weights`, tried here first.
    weights: str = ""

    def __post_init__(self):
        from .data import DIMENSIONS

        if self.tokens not in REDUCTIONS:
            raise ValueError(f"`tokens` must be one of {REDUCTIONS}, got {self.tokens!r}.")
        self.weight_map()  # raises on a bad weight
        unknown = sorted(set(self.dimension_list()) - set(DIMENSIONS))
        if unknown:
            raise ValueError(f"`dimensions` has unknown {unknown}; choose from {DIMENSIONS}.")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}.")

    def dimension_list(self) -> list:
        return [d.strip() for d in self.dimensions.split(",") if d.strip()]

    def weight_map(self) -> dict:
        from .data import parse_dimension_weights

        return parse_dimension_weights(self.weights)

    def result_name(self) -> str:
        """`reader-<tokens>[-<dimensions>][-<dimension>x<weight>...][-s<seed>].json` under `<output>/probes` (the
        seed only when it is not 0: probes of several seeds sit side by side)."""
        weighted = [f"{d}x{w}" for d, w in sorted(self.weight_map().items())]
        seed = [f"s{self.seed}"] if self.seed else []
        return "-".join(["reader", self.tokens, *self.dimension_list(), *weighted, *seed]) + ".json"


@torch.no_grad()
def tower_tokens(clip_dir: str, processor, data_dir: str, split: str, feature_layer: int = -2) -> torch.Tensor:
    """The feature layer's patch tokens (n, 576, Cv) for every picture of a split, cached next to the tower
    (`<clip_dir>/tokens-<split>.pt`, keyed by the tower's weights' modification time)."""
    from transformers import CLIPModel

    from .towers import _feature_index, _run_to_feature_layer, load_pixels

    weights = os.path.join(clip_dir, "model.safetensors")
    cache = os.path.join(clip_dir, f"tokens-{split}.pt")
    stamp = os.path.getmtime(weights)
    if os.path.exists(cache):
        stored = torch.load(cache)
        if stored["stamp"] == stamp:
            return stored["tokens"]
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    index = _feature_index(clip.config.vision_config.num_hidden_layers, feature_layer)
    with open(os.path.join(data_dir, f"{split}.json")) as f:
        records = json.load(f)
    chunks = []
    for begin in range(0, len(records), 100):
        pixels = load_pixels(processor, os.path.join(data_dir, "images"), records[begin:begin + 100])
        chunks.append(_run_to_feature_layer(clip.vision_model, pixels, index)[index][:, 1:])  # (N, 576, Cv)
    tokens = torch.cat(chunks)
    torch.save({"stamp": stamp, "tokens": tokens}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return tokens


def reduce_tokens(tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """(N, 576, C) -> (N, 36, C) by 4 x 4 average pooling (`pool36`), or unchanged (`full`)."""
    if reduction == "full":
        return tokens
    n, patches, channels = tokens.shape
    side = int(patches**0.5)
    grid = tokens.view(n, side, side, channels).permute(0, 3, 1, 2)  # (N, C, 24, 24)
    return F.avg_pool2d(grid, side // 6).flatten(2).transpose(1, 2)  # (N, 36, C)


def _questions(tokenizer, data_dir: str, split: str) -> list:
    """(picture index, prompt ids, answer id, dimension) for every question of a split."""
    with open(os.path.join(data_dir, f"{split}.json")) as f:
        picture_index = {r["image"]: i for i, r in enumerate(json.load(f))}
    with open(os.path.join(data_dir, f"{split}_vqa.json")) as f:
        samples = json.load(f)
    items = []
    for sample in samples:
        question = sample["conversations"][0]["value"].replace("<image>\n", "")
        answer = tokenizer(" " + sample["conversations"][1]["value"], add_special_tokens=False).input_ids
        if len(answer) != 1:
            raise ValueError(f"The reader probe scores one-token answers; {sample['id']} has {len(answer)} tokens.")
        prompt = tokenizer("\nUSER: " + question + " ASSISTANT:", add_special_tokens=False).input_ids
        items.append((picture_index[sample["image"]], prompt, answer[0], sample["dimension"]))
    return items


class Reader(torch.nn.Module):
    """MLP projector + the LLM; scores the next token after `<s> [visual] prompt`."""

    def __init__(self, llm, vision_width: int, bos_id: int, pad_id: int):
        super().__init__()
        width = llm.config.hidden_size
        self.projector = torch.nn.Sequential(torch.nn.Linear(vision_width, width), torch.nn.GELU(),
                                             torch.nn.Linear(width, width))
        self.llm = llm
        self.bos_id, self.pad_id = bos_id, pad_id

    def forward(self, visual: torch.Tensor, prompts: list) -> torch.Tensor:
        n, length = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, length), self.pad_id)
        text_mask = torch.zeros(n, length, dtype=torch.long)
        for row, prompt in enumerate(prompts):  # right padding: the last real token is read below
            ids[row, :len(prompt)] = torch.tensor(prompt)
            text_mask[row, :len(prompt)] = 1
        embed = self.llm.get_input_embeddings()
        inputs = torch.cat([embed(torch.full((n, 1), self.bos_id)), self.projector(visual), embed(ids)], 1)
        prefix = 1 + visual.shape[1]
        mask = torch.cat([torch.ones(n, prefix, dtype=torch.long), text_mask], 1)  # (N, 1 + T + L)
        hidden = self.llm.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        last = prefix + text_mask.sum(1) - 1  # (N,)
        return self.llm.lm_head(hidden[torch.arange(n), last])  # (N, vocab)


def run_probe(output: str, settings: ProbeSettings) -> dict:
    """Train the reader on the train split of `<output>/data` with the foundation in `<output>/foundation`; returns
    (and writes to `<output>/probes/<settings.result_name()>`) the accuracy curve per dimension on the validation split."""
    from transformers import AutoProcessor, LlamaForCausalLM

    from qmop_tools.bench.report import write_atomic

    from .data import CHANCE
    from .towers import _cosine_lr

    data_dir, foundation = os.path.join(output, "data"), os.path.join(output, "foundation")
    processor = AutoProcessor.from_pretrained(os.path.join(foundation, "processor"), trust_remote_code=True)
    tokenizer = processor.tokenizer
    clip_dir = os.path.join(foundation, "clip")
    features = {split: reduce_tokens(tower_tokens(clip_dir, processor, data_dir, split), settings.tokens)
                for split in ("train", "val")}
    train, val = _questions(tokenizer, data_dir, "train"), _questions(tokenizer, data_dir, "val")
    chosen = settings.dimension_list()
    if chosen:
        train, val = ([item for item in items if item[3] in chosen] for items in (train, val))
    torch.manual_seed(settings.seed)
    reader = Reader(LlamaForCausalLM.from_pretrained(os.path.join(foundation, "llm")), features["train"].shape[-1],
                    tokenizer.bos_token_id, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=settings.lr, weight_decay=0.0)

    @torch.no_grad()
    def accuracy() -> dict:
        reader.eval()
        hits = {}
        for begin in range(0, len(val), 100):
            chunk = val[begin:begin + 100]
            visual = features["val"][torch.tensor([item[0] for item in chunk])]
            predicted = reader(visual, [item[1] for item in chunk]).argmax(-1).tolist()
            for (_, _, answer, dimension), guess in zip(chunk, predicted):
                hits.setdefault(dimension, []).append(guess == answer)
        reader.train()
        return {d: round(100 * sum(v) / len(v), 1) for d, v in sorted(hits.items())}

    weights = settings.weight_map()
    epoch = [i for i, item in enumerate(train) for _ in range(weights.get(item[3], 1))]
    rng = random.Random(settings.seed)
    order, losses, curve, start = [], [], [], time.time()
    reader.train()
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            order += rng.sample(epoch, len(epoch))
        batch, order = [train[i] for i in order[:settings.batch_size]], order[settings.batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, settings.steps, settings.lr, warmup=max(1, settings.steps // 20))
        logits = reader(features["train"][torch.tensor([item[0] for item in batch])], [item[1] for item in batch])
        loss = F.cross_entropy(logits, torch.tensor([item[2] for item in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            recent = losses[-settings.eval_every:]
            curve.append({"step": step + 1, "loss": round(sum(recent) / len(recent), 4), "val_accuracy": accuracy(),
                          "seconds": round(time.time() - start, 1)})
            logger.info("reader probe (%s) step %d/%d: loss %.3f, val accuracy %s", settings.tokens, step + 1,
                        settings.steps, curve[-1]["loss"], curve[-1]["val_accuracy"])
    result = {"settings": asdict(settings), "tower_mtime": os.path.getmtime(os.path.join(clip_dir, "model.safetensors")),
              "tokens_per_picture": features["train"].shape[1],
              "chance": {d: round(100 * c, 1) for d, c in CHANCE.items()}, "curve": curve,
              "tower": os.path.join(foundation, "report-vision.json")}
    os.makedirs(os.path.join(output, "probes"), exist_ok=True)
    write_atomic(os.path.join(output, "probes", settings.result_name()), json.dumps(result, indent=1))
    return result


def reader_probe_once(output: str, settings: ProbeSettings) -> dict:
    """`run_probe`, unless `<output>/probes/<settings.result_name()>` was written with the same settings on the same
    tower weights (the benchmark runs the probe after the foundation; a second invocation reuses it)."""
    path = os.path.join(output, "probes", settings.result_name())
    weights = os.path.join(output, "foundation", "clip", "model.safetensors")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("settings") == asdict(settings) and previous.get("tower_mtime") == os.path.getmtime(weights):
            return previous
    return run_probe(output, settings)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qmop reader-probe", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="outputs/vtcbench", help="the benchmark folder (data and foundation built)")
    for name, default in asdict(ProbeSettings()).items():
        parser.add_argument(f"--{name}", type=type(default), default=default,
                            **({"choices": REDUCTIONS} if name == "tokens" else {}))
    args = parser.parse_args(argv)
    for part in ("data", "foundation/clip", "foundation/llm", "foundation/processor"):
        if not os.path.isdir(os.path.join(args.output, part)):
            parser.error(f"{os.path.join(args.output, part)} is missing: build the data and foundation first "
                         "(qmop vtcbench --output ... builds them)")
    settings = ProbeSettings(**{name: getattr(args, name) for name in asdict(ProbeSettings())})
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO, stream=sys.stdout)
    logging.getLogger("transformers").setLevel(logging.WARNING)
    result = run_probe(args.output, settings)
    print(json.dumps(result["curve"][-1], indent=1))
    return result


if __name__ == "__main__":
    main()
