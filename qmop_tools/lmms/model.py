"""lmms-eval model entry `qmop`: a QMoP-LLaVA folder or Hub id answered the way a Hub user runs it.

    python -m lmms_eval --model qmop --model_args pretrained=checkpoints/qmop-tiny,num_visual_tokens=36 \
        --tasks mini_vtcbench --include_path <task folder> --batch_size 8 --device cpu

Per batch of requests: the task's chat messages -> `processor.apply_chat_template` (the folder's template) ->
`processor(images=..., text=...)` (the question for the router is read from the rendered prompt) -> `generate`
-> `processor.batch_decode` of the new tokens. This is what `qmop_tools.vtcbench.experiment.evaluate` does, so the
two give the same answers on the same items (tests/test_lmms_eval.py).

model_args: `pretrained` (folder or Hub id), `dtype` ("auto": the checkpoint's; or "float32", "bfloat16", ...),
`num_visual_tokens` (the budget M for every request; default the processor's), `trust_remote_code` (default True:
the folder's own code is what is evaluated), `attn_implementation`. `--batch_size N` batches N requests (left
padded); `--device` defaults to cuda when there is one. One process: no data parallelism.
"""

import json
from typing import List, Optional

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor


class QMoPLMMs(lmms):
    is_simple = False  # chat entry: requests carry `doc_to_messages`

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        num_visual_tokens: Optional[int] = None,
        trust_remote_code: bool = True,
        attn_implementation: Optional[str] = None,
        batch_size=1,
        max_batch_size: Optional[int] = None,
        device: Optional[str] = None,
    ) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by the qmop entry: give a number.")
        self.batch_size_per_gpu = int(batch_size)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load = {"trust_remote_code": trust_remote_code, "dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation is not None:
            load["attn_implementation"] = attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, **load).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.num_visual_tokens = num_visual_tokens

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        """Answers in request order; requests with the same generation arguments are batched together, in order."""
        results = [None] * len(requests)
        groups = {}  # generation arguments -> request indices, in order
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[2], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for indices in groups.values():
            for begin in range(0, len(indices), self.batch_size):
                batch = indices[begin:begin + self.batch_size]
                texts = self._generate([requests[i].args for i in batch])
                for i, text in zip(batch, texts):
                    context, _, gen_kwargs = requests[i].args[:3]
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    results[i] = GenerationResult(text=text)
                progress.update(len(batch))
        progress.close()
        return results

    @torch.no_grad()
    def _generate(self, batch_args) -> List[str]:
        chats, images = [], []
        for _, doc_to_messages, _, doc_id, task, split in batch_args:
            chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            pictures, videos, audios = chat.extract_media()
            if videos or audios:
                raise ValueError(f"QMoP-LLaVA reads images and text only; {task} doc {doc_id} has video or audio.")
            chats.append(chat)
            images.append(list(pictures))
        prompts = [self.processor.apply_chat_template(chat.to_hf_messages(), add_generation_prompt=True, tokenize=False)
                   for chat in chats]
        budget = {} if self.num_visual_tokens is None else {"num_visual_tokens": self.num_visual_tokens}
        # left padding: every prompt of a batch ends where generation starts
        inputs = self.processor(images=images, text=prompts, padding_side="left", return_tensors="pt", **budget)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)

        gen_kwargs = dict(batch_args[0][2])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = gen_kwargs.pop("temperature", 0) or 0
        top_p = gen_kwargs.pop("top_p", None)
        do_sample = gen_kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else do_sample
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        gen_kwargs.setdefault("max_new_tokens", 128)
        generated = self.model.generate(**inputs, do_sample=do_sample, **sampling, **gen_kwargs)
        texts = self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:  # the task's stop strings: the answer ends before the first one
            texts = [text.split(stop)[0] for text in texts]
        return texts

    # ------------------------------------------------------------------------------------------- not supported
    def loglikelihood(self, requests):
        raise NotImplementedError("The qmop entry generates answers only (tasks with output_type generate_until).")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("The qmop entry answers single-round tasks only.")
