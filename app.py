"""QMoP-LLaVA Space: ask a question about an image and see what the projector did: the answer, the patches the
pruning branch keeps, the router's weight per branch and how many visual tokens the language model reads.

    python app.py [--model DIR_OR_HUB_ID] [--host 127.0.0.1] [--port 7860] [--quiet]      (or: qmop space run ...)

The model is --model, else $QMOP_SPACE_MODEL, else the checkpoint `qmop space export` recorded, else the bundled
trained tiny checkpoint. This file is the page only: qmop_tools.demo answers, qmop_tools.space picks the model and the
budget, qmop_tools.vtcbench.visualize draws the picture. On a Hugging Face Space, GRADIO_SERVER_NAME/PORT (set by the
Hub) replace the host and port defaults.
"""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio loads: no telemetry, no version check

import gradio as gr  # noqa: E402

from qmop_tools.demo import DEFAULT_IMAGE, DEFAULT_QUESTIONS, answer_with, format_report, load  # noqa: E402
from qmop_tools.space import resolve_model, snap_budget  # noqa: E402
from qmop_tools.vtcbench.visualize import render_analysis  # noqa: E402

ABOUT = """# QMoP-LLaVA
A LLaVA-1.5 whose projector compresses the image's {patches} patches to **M visual tokens** with three branches
(**pooling**, **resampler**, **pruning**) mixed by a **router that reads the question**. Model: `{model}`{note}"""


def token_counts(result: dict) -> str:
    """The token counts of one answer as a Markdown table: compressed vs the image's uncompressed patches."""
    share = result["prompt_tokens"] / result["prompt_tokens_uncompressed"]
    return (
        "| tokens | QMoP | uncompressed |\n|---|---|---|\n"
        f"| visual tokens per image | {result['visual_tokens']} | {result['patches']} patches |\n"
        f"| prompt (KV cache at prefill) | {result['prompt_tokens']} | {result['prompt_tokens_uncompressed']} |\n\n"
        f"The prompt is {share:.0%} of its uncompressed length; {result['generated_tokens']} tokens generated."
    )


def build_app(model_path=None) -> gr.Blocks:
    path, trained = resolve_model(model_path)
    model, processor = load(path)
    num_patches = model.config.num_patches

    def ask(image, question, budget):
        if image is None:
            raise gr.Error("Upload an image first (or pick an example below).")
        if not question or not question.strip():
            raise gr.Error("Type a question about the image.")
        used = snap_budget(budget, num_patches)
        if used != budget:
            gr.Warning(f"{budget:g} visual tokens is not a perfect square: used {used}.")
        result = answer_with(model, processor, image, question.strip(), num_visual_tokens=used)
        return (result["answer"], render_analysis(result), result["router_weights"], token_counts(result),
                format_report(result, path, trained))

    shown = os.path.relpath(path) if os.path.isdir(path) else path  # a Hub id as it is
    note = "" if trained else " (tiny, RANDOM weights: its answers are noise)"
    with gr.Blocks(title="QMoP-LLaVA", analytics_enabled=False) as app:
        gr.Markdown(ABOUT.format(patches=num_patches, model=shown, note=note))
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="image")
                question = gr.Textbox(label="Question", placeholder=DEFAULT_QUESTIONS[0], elem_id="question")
                budget = gr.Slider(1, num_patches, value=model.config.num_visual_tokens, step=1, elem_id="budget",
                                   label="Visual tokens M",
                                   info=f"a perfect square up to {num_patches}; other values snap to the nearest one")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples([[DEFAULT_IMAGE, q] for q in DEFAULT_QUESTIONS], inputs=[image, question],
                            cache_examples=False)
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                analysis = gr.Image(label="What the projector did: kept patches and router weights", type="pil",
                                    format="png", interactive=False, elem_id="analysis")
                router = gr.Label(label="Router weights", elem_id="router")
                tokens = gr.Markdown(elem_id="tokens")
                with gr.Accordion("Report", open=False):
                    report = gr.Textbox(show_label=False, lines=7, interactive=False, elem_id="report")
        budget.release(lambda m: snap_budget(m, num_patches), budget, budget)
        outputs = [answer, analysis, router, tokens, report]
        ask_button.click(ask, [image, question, budget], outputs)
        question.submit(ask, [image, question, budget], outputs)
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: see above)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--quiet", action="store_true", help="print nothing when the server starts")
    args = parser.parse_args(argv)
    build_app(args.model).launch(server_name=args.host, server_port=args.port, quiet=args.quiet, share=False,
                                 allowed_paths=[os.path.dirname(DEFAULT_IMAGE)])


if __name__ == "__main__":
    main()
