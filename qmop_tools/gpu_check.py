"""Deployment check for a 7B-shaped QMoP-LLaVA with random weights (nothing is downloaded).

Writes a random checkpoint once (sharded safetensors, ~14 GB in bf16 for the 7b preset), then loads it with
`device_map="auto"` in bf16 and in 4-bit nf4, and for each prints load time, peak GPU memory, prefill time and
decode tokens/s, and asserts the placement: every module on a GPU, `Linear4bit` only inside the LLM's decoder
layers, vision tower / text encoder / projector / lm_head unquantized.

    qmop gpu-check --preset 7b                        # a GPU machine
    qmop gpu-check --preset tiny --device cpu         # the same code path on a CPU (tests use it)
"""

import argparse
import json
import os
import platform
import tempfile
import time

import torch

PRESETS = {
    "7b": dict(),  # QMoPConfig defaults: CLIP ViT-L/14-336, CLIP-L text, Vicuna-7B shapes
    "tiny": dict(width=64),
}


def build_random_checkpoint(preset: str, folder: str, dtype=torch.bfloat16) -> str:
    """Write a random-weight checkpoint for `preset` into `folder` (skipped if it is already complete)."""
    from qmop_tools.testing.tiny import build_config, build_processor  # first: it puts the remote-code files on the path

    from configuration_qmop import QMoPConfig
    from modeling_qmop import QMoPForConditionalGeneration

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    processor = build_processor(num_visual_tokens=16)
    if preset == "tiny":
        config = build_config(processor, **PRESETS["tiny"])
    else:
        config = QMoPConfig()
        processor = build_processor(num_visual_tokens=config.num_visual_tokens, image_size=336, patch_size=14)
        config.image_token_id = processor.image_token_id  # tiny tokenizer ids live inside the 32064 vocabulary
    torch.manual_seed(0)
    model = QMoPForConditionalGeneration(config).to(dtype)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)) or ".", prefix=".gpu-check-")
    model.save_pretrained(tmp, max_shard_size="2GB")
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def check(folder: str, mode: str, device: str, new_tokens: int = 32) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "trust_remote_code": True}
    if device == "cuda":
        kwargs["device_map"] = "auto"
        torch.cuda.reset_peak_memory_stats()
    if mode == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs).eval()
    load_s = time.perf_counter() - start
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    if mode == "nf4":
        assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized), quantized[:5]
    else:
        assert not quantized
    if device == "cuda":
        devices = {p.device.type for p in model.parameters()}
        assert devices == {"cuda"}, f"parameters left on {devices}"

    from PIL import Image

    image = Image.new("RGB", (336, 336), (120, 80, 40))
    inputs = processor(images=image, text="USER: <image>\nWhat colour is this image? ASSISTANT:").to(model.device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        sync()
        start = time.perf_counter()
        model(**inputs)
        sync()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        generate_s = time.perf_counter() - start
    produced = out.shape[1] - inputs["input_ids"].shape[1]
    return {
        "mode": mode,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "load_s": round(load_s, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "memory_footprint_gib": round(model.get_memory_footprint() / 2**30, 3),
        "prefill_ms": round(prefill_s * 1000, 1),
        "decode_tokens_per_s": round(produced / max(generate_s - prefill_s, 1e-9), 1),
        "linear4bit_modules": len(quantized),
        "hf_device_map_devices": sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="qmop gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--folder", default=None, help="where the random checkpoint is written (reused if present)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", choices=["bf16", "nf4"], default=["bf16", "nf4"])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    import transformers

    folder = args.folder or os.path.join(os.path.expanduser("~"), ".cache", f"qmop-{args.preset}-random")
    build_random_checkpoint(args.preset, folder)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}))
    for mode in args.modes:
        print(json.dumps(check(folder, mode, args.device, args.new_tokens)))
