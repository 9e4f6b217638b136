"""Train a router again, offline, on the targets of a finished run: is a routing failure the router's or the data's?

A model trained with `router_training="outcome"` and `router_outcome_branches="all"` reads every branch, whatever its
router chooses. So its per-branch losses on the training questions are the targets any router of that run regresses,
and its answers on the test questions with each branch forced say what each routing would score. This module

1. collects, for every training and test question, the router's inputs (the vision CLS token and the question's EOS
   embedding, as `QueryGuidedRouter` receives them) and the language-model loss of the answer through each branch,
   and for every test question whether the greedy answer through each branch is right;
2. trains fresh routers of the model's own class (`QueryGuidedRouter`, the model's config, `router_input_norm` set
   as asked) on those targets, with the run's data weights, batch size and learning rate, and several seeds;
3. reports, for each, the routing per question type on the test split and the accuracy it reaches through the
   model's own forced-branch answers, next to each branch forced and the per-type oracle.

The targets here are those of the finished model; in training they move with it. Measured on the mini VTCBench
(docs/vtcbench.md, "Why the router sent spatial questions to pruning").

    python -m qmop_tools.vtcbench.router_offline --model RUN/model --data OUTPUT/data --output router_offline.json
"""

import argparse
import collections
import copy
import json
import os

import torch
import torch.nn.functional as F

from qmop_tools.bench.report import write_atomic
from qmop_tools.progress import progress_bar

from .data import DIMENSIONS, parse_dimension_weights


@torch.no_grad()
def collect(model, processor, data_dir: str, split: str, batch_size: int = 50, limit=None) -> dict:
    """{cls (S, Cv), query (S, Ct), losses (S, nb), dims [S], ids [S]} for the split's questions."""
    from qmop_tools.train.data import LazyLLaVADataset, QMoPDataCollator

    from modeling_qmop import per_sample_lm_loss

    data = LazyLLaVADataset(os.path.join(data_dir, f"{split}_vqa.json"), processor,
                            image_folder=os.path.join(data_dir, "images"))
    count = len(data) if limit is None else min(limit, len(data))
    collate = QMoPDataCollator.from_processor(processor)
    router = model.model.projector.router
    seen = {}
    hook = router.register_forward_hook(lambda module, args, out: seen.__setitem__("cls", args[0].float()))
    cls, query, losses = [], [], []
    try:
        for begin in progress_bar(range(0, count, batch_size), desc=f"router targets ({split})"):
            batch = collate([data[i] for i in range(begin, min(count, begin + batch_size))])
            labels = batch.pop("labels")
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts the token at t + 1
            query.append(model.model.get_query_embeds(batch["query_input_ids"], batch["query_attention_mask"]).float())
            row = []
            for branch in model.config.branches:
                with model.forced_branch(branch):
                    row.append(per_sample_lm_loss(model(**batch).logits, targets))
            cls.append(seen["cls"])
            losses.append(torch.stack(row, dim=1))
    finally:
        hook.remove()
    samples = data.samples[:count]
    return {"cls": torch.cat(cls), "query": torch.cat(query), "losses": torch.cat(losses),
            "dims": [s["dimension"] for s in samples], "ids": [s["id"] for s in samples]}


def forced_correctness(model, processor, model_dir: str, data_dir: str, ids: list, batch_size: int = 50,
                       limit=None) -> torch.Tensor:
    """(S, nb) bool: the greedy answer to each test question through each branch is right."""
    from .experiment import evaluate

    correct = {}
    for branch in model.config.branches:
        with model.forced_branch(branch):
            summary = evaluate(model_dir, data_dir, "test", batch_size, limit=limit, model=model, processor=processor)
        correct[branch] = {p["id"]: p["correct"] for p in summary["predictions"]}
    return torch.tensor([[correct[b][i] for b in model.config.branches] for i in ids])


def train_router(model, train: dict, mode: str, norm: str, seed: int, epochs: float, lr: float, batch_size: int,
                 weights: dict):
    """A fresh router (this repository's class; the model's config but `router_mode=mode` and
    `router_input_norm=norm`), regressing every branch's negated loss on every training question (what
    `router_outcome_branches="all"` does); AdamW, as the trainer."""
    from modeling_qmop import QueryGuidedRouter

    config = copy.deepcopy(model.config)
    config.router_mode = mode
    config.router_input_norm = norm
    torch.manual_seed(seed)
    router = QueryGuidedRouter(config).train()
    uses_query = router.uses_query
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    index = torch.tensor([i for i, d in enumerate(train["dims"]) for _ in range(weights.get(d, 1))])
    steps = int(round(epochs * len(index) / batch_size))
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([index[torch.randperm(len(index), generator=generator)]
                       for _ in range(int(epochs) + 1)])[: steps * batch_size]
    for batch in order.split(batch_size):
        logits = router.logits(train["cls"][batch], train["query"][batch] if uses_query else None)
        loss = (-logits - train["losses"][batch]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return router.eval()


def routing_report(choice: torch.Tensor, test: dict, branches: list) -> dict:
    correct = test["correct"][torch.arange(len(choice)), choice].float()
    out = {"overall": round(100 * correct.mean().item(), 1), "per_dimension": {}, "routed": {}}
    for dim, rows in _rows_per_type(test["dims"]).items():
        out["per_dimension"][dim] = round(100 * correct[rows].mean().item(), 1)
        counts = collections.Counter(branches[c] for c in choice[rows].tolist())
        out["routed"][dim] = {b: round(counts[b] / len(rows), 3) for b in branches}
    return out


def _rows_per_type(dims: list) -> dict:
    """{question type: the indices of its questions}, in DIMENSIONS order, types with no question left out."""
    rows = {dim: [i for i, d in enumerate(dims) if d == dim] for dim in DIMENSIONS}
    return {dim: r for dim, r in rows.items() if r}


def study(model_dir: str, data_dir: str, modes=("query", "vision"), norms=("layer", "standardize"), seeds=(0, 1, 2),
          epochs: float = 3.0, lr: float = 1e-3, batch_size: int = 32, stage2_weights: str = "counting=3,local=3",
          limit=None) -> dict:
    """Routers of each mode (`query`: reads the question; `vision`: the picture only) and input norm, each over the
    seeds, trained on the targets of the model at `model_dir` (trained with `router_outcome_branches="all"`)."""
    from modeling_qmop import QMoPForConditionalGeneration
    from processing_qmop import QMoPProcessor

    from .experiment import FeatureCache

    # This repository's classes, not the checkpoint's copies: a run saved before `router_input_norm` existed has code
    # that would build every router with LayerNorm alone.
    model = QMoPForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = QMoPProcessor.from_pretrained(model_dir)
    FeatureCache().install(model)  # the frozen tower runs once per picture, not once per branch and question
    branches = list(model.config.branches)
    train = collect(model, processor, data_dir, "train", limit=limit)
    test = collect(model, processor, data_dir, "test", limit=limit)
    test["correct"] = forced_correctness(model, processor, model_dir, data_dir, test["ids"], limit=limit)
    weights = parse_dimension_weights(stage2_weights)
    result = {"model": model_dir, "branches": branches, "router_mode": model.config.router_mode,
              "epochs": epochs, "lr": lr, "batch_size": batch_size, "stage2_weights": stage2_weights,
              "mean_train_loss": {}, "forced": {}, "routers": {}}
    mean_loss = {dim: train["losses"][rows].mean(0) for dim, rows in _rows_per_type(train["dims"]).items()}  # (nb,)
    result["mean_train_loss"] = {dim: dict(zip(branches, [round(v, 4) for v in loss.tolist()]))
                                 for dim, loss in mean_loss.items()}
    for column, branch in enumerate(branches):
        result["forced"][branch] = routing_report(torch.full((len(test["ids"]),), column), test, branches)
    lowest_loss = {dim: int(loss.argmin()) for dim, loss in mean_loss.items()}
    result["lowest_mean_train_loss_per_type"] = routing_report(
        torch.tensor([lowest_loss[d] for d in test["dims"]]), test, branches)
    best = {dim: int(test["correct"][rows].float().mean(0).argmax())  # the branch answering the type best
            for dim, rows in _rows_per_type(test["dims"]).items()}
    result["oracle_per_type"] = routing_report(torch.tensor([best[d] for d in test["dims"]]), test, branches)
    for mode in modes:
        for norm in norms:
            runs = []
            for seed in seeds:
                router = train_router(model, train, mode, norm, seed, epochs, lr, batch_size, weights)
                with torch.no_grad():
                    choice = router.logits(test["cls"], test["query"] if router.uses_query else None).argmax(-1)
                runs.append(routing_report(choice, test, branches) | {"seed": seed})
            overall = torch.tensor([r["overall"] for r in runs])
            result["routers"][f"{mode}/{norm}"] = {
                "router_mode": mode, "router_input_norm": norm, "runs": runs,
                "overall_mean": round(overall.mean().item(), 1),
                "overall_std": round(overall.std().item() if len(runs) > 1 else 0.0, 1),
            }
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m qmop_tools.vtcbench.router_offline",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a finished run's model folder (runs/<variant>-s<seed>/model)")
    parser.add_argument("--data", required=True, help="the benchmark's data folder")
    parser.add_argument("--output", required=True, help="JSON file for the result")
    parser.add_argument("--modes", nargs="+", default=["query", "vision"], choices=["query", "vision"],
                        help="routers that read the question, the picture only, or both kinds (default)")
    parser.add_argument("--norms", nargs="+", default=["layer", "standardize"], choices=["layer", "standardize"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=3.0, help="the benchmark's stage-2 epochs (default 3)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the benchmark's stage-2 learning rate (default 1e-3)")
    parser.add_argument("--stage2-weights", default="counting=3,local=3")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each split (tests)")
    args = parser.parse_args(argv)
    for path, what in ((args.model, "--model"), (args.data, "--data")):
        if not os.path.isdir(path):
            parser.error(f"{what} {path!r} is not a folder")
    result = study(args.model, args.data, modes=tuple(args.modes), norms=tuple(args.norms), seeds=tuple(args.seeds),
                   epochs=args.epochs, lr=args.lr, stage2_weights=args.stage2_weights, limit=args.limit)
    write_atomic(args.output, json.dumps(result, indent=1))
    for summary in result["routers"].values():
        print(f"router_mode={summary['router_mode']}, router_input_norm={summary['router_input_norm']}: "
              f"{summary['overall_mean']} ± {summary['overall_std']} (oracle per type "
              f"{result['oracle_per_type']['overall']})")
    return result


if __name__ == "__main__":
    main()
