"""bench/results/fullsize.md from the figures tests/fullsize collects (bench/results/fullsize.json)."""
from __future__ import annotations

GIB = 1024 ** 3


def _g(b) -> str:
    return "–" if b is None else f"{b / GIB:.2f}"


def _s(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    m = r.get("machine", {})
    out = ["# GLM-Image at the official size, on a CPU machine", "",
           f"Machine: {m.get('cpus')} cores, {m.get('ram_gib')} GiB RAM, no GPU ({m.get('platform')}); {m.get('date')}.",
           "Written by `make fullsize` (tests/fullsize, bench/fullsize.py): the random full-size checkpoint in the "
           "official layout (bf16, shards ≤ 5 GB), each job in a fresh process; RSS is the process's peak (VmHWM), "
           "interpreter and torch included.", ""]
    ck = r.get("checkpoint")
    if ck:
        lay = ck.get("layout", {})
        total = sum(sum(f["bytes"]) for f in lay.values())
        out += ["## Checkpoint", "",
                f"{total / 1e9:.1f} GB on disk: " + ", ".join(f"{c} {sum(f['bytes']) / 1e9:.1f} GB in {len(f['files'])} file(s)"
                                                            for c, f in lay.items()) +
                (f"; written in {ck['seconds'] / 60:.1f} min." if ck.get("written") else " (reused)."), ""]
    if r.get("load"):
        out += ["## Streamed loading (one network per process)", "",
                "| network | storage | params | in memory (GiB) | peak RSS (GiB) | bound: memory + 1 GiB | load (s) |",
                "|---|---|---|---|---|---|---|"]
        order = {c: i for i, c in enumerate(("ar_text", "ar_vision", "dit", "glyph_encoder", "vae"))}
        for x in sorted(r["load"], key=lambda x: (x["dtype"], order.get(x["component"], 9))):
            ok = "ok" if x["peak_rss"] <= x["final_bytes"] + GIB else "**exceeded**"
            out.append(f"| {x['component']} | {x['dtype']} | {x['params'] / 1e9:.3f} B | {_g(x['final_bytes'])} | "
                       f"{_g(x['peak_rss'])} | {ok} | {x['seconds']:.1f} |")
        out += ["", "bf16 weights stay in the file's pages (copy-on-write mapping): they are paged in when first "
                "used and the OS can drop them again under memory pressure, so a stage that is done does not pin RAM.", ""]
    for kind, title in (("ar-logits", "AR: logits of the first sampled token (256² prompt)"),
                        ("dit-forward", "DiT: one forward at 256²")):
        p = r.get(kind)
        if p and "rel_l2" in p:
            out += [f"## Parity with the official classes, bf16: {title}", "",
                    f"relative L2 vs official: **{p['rel_l2']:.2g}** (tolerance {p['tolerance']:.2g}: one bf16 rounding of "
                    f"the output); negative control (one layer's weights ×1.01): {p['rel_l2_negative_control']:.2g}. Official load {p['official']['load_s']:.0f} s, "
                    f"peak RSS {_g(p['official']['peak_rss'])} GiB; ours {p['ours']['load_s']:.1f} s, {_g(p['ours']['peak_rss'])} GiB "
                    f"(file pages the forward touched included).", ""]
    if r.get("t2i"):
        out += ["## Whole text-to-image through ComfyUI (256², 2 steps, cfg 1.5, compute bf16)", "",
                "| storage | ComfyUI | total (min) | AR s/token | AR tokens | DiT s/step | peak RSS (GiB) | image |",
                "|---|---|---|---|---|---|---|---|"]
        for x in r["t2i"]:
            img = "finite" if x.get("image_finite") else "NOT finite"
            out.append(f"| {x['dtype']} | {x.get('comfyui', '?')} | {x['seconds'] / 60:.1f} | {_s(x['ar_s_per_token'], '{:.2f}')} | "
                       f"{x['ar_tokens']} | {_s(x['dit_s_per_step'])} | {_g(x['peak_rss'])} | {x['image_shape']} {img} |")
        out.append("")
    if r.get("train"):
        out += ["## DiT LoRA training steps through ComfyUI's Train LoRA (one 512² image, rank 16, bf16, "
                "gradient checkpointing per block)", "",
                "The dataset part (vision tower, glyph encoder, VAE) runs first; the peak RSS after it and after "
                "training are the process's VmHWM at those points, file pages of the mapped weights included.", "",
                "| storage | ComfyUI | steps | s / step | peak RSS after the dataset part (GiB) | peak RSS (GiB) | "
                "losses |", "|---|---|---|---|---|---|---|"]
        for x in r["train"]:
            out.append(f"| {x['dtype']} | {x.get('comfyui', '?')} | {x['steps']} | {_s(x['s_per_step'])} | "
                       f"{_g(x['peak_rss_after_dataset'])} | {_g(x['peak_rss'])} | "
                       f"{', '.join(f'{v:.3f}' for v in x['loss'])} |")
        out.append("")
    if r.get("ar_train"):
        out += ["## AR LoRA training steps through GLM-Image Train AR LoRA (one 256² image: 320 target tokens, "
                "rank 16, compute bf16, gradient checkpointing per decoder layer)", "",
                "The image is tokenised first (vision tower), then the AR's text part trains; the peak RSS is the "
                "process's VmHWM, file pages of the mapped weights included.", "",
                "| storage | ComfyUI | steps | s / step | peak RSS (GiB) | losses |", "|---|---|---|---|---|---|"]
        for x in r["ar_train"]:
            out.append(f"| {x['dtype']} | {x.get('comfyui', '?')} | {x['steps']} | {_s(x['s_per_step'])} | "
                       f"{_g(x['peak_rss'])} | {', '.join(f'{v:.3f}' for v in x['loss'])} |")
        out.append("")
    gg = r.get("gguf")
    if gg and gg.get("convert"):
        c = gg["convert"]
        out += [f"## GGUF ({c['dtype']}): conversion and loading", "",
                "`scripts/convert_to_single_file.py --dtype " + c["dtype"] + "`'s code on the bf16 folder, tensor by "
                "tensor; then each network loaded from its .gguf with the blocks kept quantized.", "",
                "| network | file (GiB) | tensor types | convert (min) | peak RSS converting (GiB) |", "|---|---|---|---|---|"]
        for comp, x in c["components"].items():
            types = ", ".join(f"{k} {v}" for k, v in sorted(x["types"].items()))
            out.append(f"| {comp} | {_g(x['bytes'])} | {types} | {x['seconds'] / 60:.1f} | {_g(x['peak_rss'])} |")
        out.append("")
        if gg.get("load"):
            out += ["| network | in memory (GiB) | of which blocks (GiB) | peak RSS loading (GiB) | load (s) |",
                    "|---|---|---|---|---|"]
            for x in gg["load"]:
                out.append(f"| {x['component']} | {_g(x['final_bytes'])} | {_g(x['bytes_by_dtype'].get('torch.uint8'))} | "
                           f"{_g(x['peak_rss'])} | {x['seconds']:.1f} |")
            out.append("")
        for kind, title in (("dit-forward", "DiT forward at 256²"), ("ar-logits", "AR first-token logits")):
            p = gg.get(kind)
            if p and "rel_l2" in p:
                q = p[c["dtype"]]
                out.append(f"- {title}: relative L2 vs the bf16 network **{p['rel_l2']:.3f}**; {q['seconds']:.0f} s with "
                           f"load (bf16: {p['ours']['seconds']:.0f} s), peak RSS {_g(q['peak_rss'])} GiB "
                           f"(bf16: {_g(p['ours']['peak_rss'])} GiB).")
        out.append("")
    part = r.get("t2i_fp8_partial")
    if part and not any(x["dtype"] == "fp8" for x in r.get("t2i", [])):
        out += [f"fp8 storage: **not completed here.** The AR reached {part['tokens_reached']} of {part['of']} tokens, at "
                f"{part['s_per_token_uncontended']:.0f} s per token on the quiet machine ({part['note']}). On a CPU, fp8 "
                "storage costs one fp8 → bf16 conversion of every weight of the AR per token (ComfyUI's manual cast, "
                "comfy.ops), about 8.2 G elements; fp8 is a GPU format, and on this machine the whole run would take "
                "about 2 hours.", ""]
    return "\n".join(out) + "\n"
