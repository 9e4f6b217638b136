"""Run in a fresh process (cwd outside the repo, repo not on sys.path): load a QMoP folder with Auto* classes and
trust_remote_code, generate greedily, print JSON. Used by the loading tests, also across transformers versions."""

import json
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
causal = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.fromarray((np.random.RandomState(0).rand(60, 40, 3) * 255).astype("uint8"))
inputs = processor(images=image, text="USER: <image>\nWhat colour is the circle? ASSISTANT:")
with torch.no_grad():
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    router = model(**inputs).router_weights
print(json.dumps({
    "transformers": transformers.__version__,
    "classes": [type(config).__name__, type(model).__name__, type(base).__name__, type(causal).__name__, type(processor).__name__],
    "module": type(model).__module__,
    "tokens": tokens.tolist(),
    "router_weights": router.tolist(),
}))
