"""The model card (README.md) of a converted folder: Hub metadata, budget and branches, provenance, which parts are
untrained, the verification numbers, the `qmop convert` command that reproduces the conversion, usage and citations.
"""

import json
import os

from configuration_qmop import QMoPConfig
from conversion.settings import ConversionSettings
from qmop_tools.checks import looks_like_hub_id


MODEL_CARD_TAGS = ("qmop", "llava", "visual-token-compression", "mixture-of-projectors", "custom_code")


def conversion_command(settings: ConversionSettings) -> str:
    """The command line that reproduces a conversion (paths as given; no token)."""
    parts = ["qmop convert", f"--llava {settings.llava}", f"--clip {settings.clip}"]
    if settings.vision_tower:
        parts.append(f"--vision-tower {settings.vision_tower}")
    parts += [f"--output {os.path.basename(os.path.abspath(settings.output))}",
              f"--num-visual-tokens {settings.num_visual_tokens}", "--branches " + " ".join(settings.branches),
              f"--dtype {settings.dtype}", f"--seed {settings.seed}"]
    parts += [f"--config-override {k}={json.dumps(v)}" for k, v in settings.config_overrides.items()]
    if settings.pad_to_square is not None:
        parts.append("--pad-to-square" if settings.pad_to_square else "--no-pad-to-square")
    return " \\\n    ".join(parts)


def model_card(settings: ConversionSettings, config: QMoPConfig, summary: dict, fresh_keys) -> str:
    """README.md with Hub metadata (pipeline_tag, library_name, base_model, tags), budget, branches, provenance,
    verification results, usage and citation. `summary`: layout, dtype and the two max abs diffs."""
    base = [settings.base_model] if settings.base_model else [n for n in (settings.llava, settings.clip) if looks_like_hub_id(n)]
    front_matter = ["pipeline_tag: image-text-to-text", "library_name: transformers"]
    if base:
        front_matter += ["base_model:"] + [f"- {b}" for b in base]
    front_matter += ["tags:"] + [f"- {tag}" for tag in MODEL_CARD_TAGS]
    branches = ", ".join(config.branches)
    # model.projector.resampler_branch.layers.0.q_proj.weight -> resampler_branch.layers
    fresh = sorted({".".join(k.split(".")[2:4]) if "_branch." in k else k.split(".")[2] for k in fresh_keys})
    header = "---\n" + "\n".join(front_matter) + "\n---\n"
    return header + f"""
# QMoP-LLaVA ({config.num_visual_tokens} visual tokens; branches: {branches})

LLaVA-1.5 with a Query Guided Mixture-of-Projector: the {config.num_patches} CLIP patch tokens of each image are
compressed to **{config.num_visual_tokens} tokens** by the {branches} branch(es), mixed per image by a router that
reads the user's question through a CLIP text encoder.

Converted with `qmop convert` from `{settings.llava}` (layout: {summary['layout']}) and
the text tower of `{settings.clip}`; weights in {summary['dtype']}.

- Each branch's expert MLP is a copy of LLaVA's projector (`mlp2x_gelu`).
- Freshly initialised (seed {settings.seed}), i.e. **untrained**: {', '.join(f'`{name}`' for name in fresh) or 'nothing'}.
  Until QMoP's two training stages have run, LLaVA-1.5's quality is only to be expected at the full budget
  ({config.num_patches} tokens) with the pooling branch; other budgets and branches need training.
- Verified before saving: with {config.num_patches} tokens and the pooling branch only, the converted weights give
  the logits of transformers' `LlavaForConditionalGeneration` (max abs diff {summary['reference_max_abs_diff']:.3g});
  the saved folder reloads through `Auto*` with `trust_remote_code=True` (max abs diff {summary['reload_max_abs_diff']:.3g}).

Reproduce with:

```bash
{conversion_command(settings)}
```

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(REPO, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(REPO, trust_remote_code=True)
inputs = processor(images=image, text="USER: <image>\\nWhat is shown? ASSISTANT:")
out = model.generate(**inputs, max_new_tokens=32)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## License

The weights inherit the licenses of the base models (LLaVA-1.5 / Vicuna: Llama 2 Community License; CLIP: MIT).

## Citation

```bibtex
@misc{{li2026qmop,
  title  = {{QMoP: Query Guided Mixture-of-Projector for Efficient Visual Token Compression}},
  author = {{Li, Zhongyang and Li, Yaqian and Fang, Faming and Takezoe, Rinyoichi and Bo, Zi-Hao and Qian, Cheng and Guang, Mo and Zhang, Guixu and Long, Kaiwen}},
  year   = {{2026}},
  eprint = {{2603.21232}},
  archivePrefix = {{arXiv}}
}}
@inproceedings{{liu2024improved,
  title     = {{Improved Baselines with Visual Instruction Tuning}},
  author    = {{Liu, Haotian and Li, Chunyuan and Li, Yuheng and Lee, Yong Jae}},
  booktitle = {{CVPR}},
  year      = {{2024}}
}}
```
"""
