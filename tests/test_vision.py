"""Phi-3-vision / Phi-3.5-vision: preprocessing, tower, merge, projector and decoder against a torch
reference written from the definition (tests/vision_ref.py), through the real loader."""

from __future__ import annotations

import gzip
import json

import mlx.core as mx
import numpy as np
import pytest

from phi3mlx.errors import Phi3MLXError
from phi3mlx.generate import generate_step
from phi3mlx.image import CROP, bicubic_resize, hd_size, image_tokens, preprocess
from phi3mlx.loader import load
from phi3mlx.models import build_model, parse_config, place_rows
from phi3mlx.processor import Processor, image_order
from mlx.utils import tree_flatten

from .helpers import DATA, TOL, reference_config
from .vision_ref import RefVision, palette_png, photo, ref_preprocess, screenshot, vision_config

PIX_TOL = 1e-5


@pytest.fixture(scope="module")
def transformers_mod():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory, torch_mod, transformers_mod):
    """Factory: (folder, RefVision) for a config (cached per arguments)."""
    made = {}

    def build(name="Phi-3-vision-128k-instruct", seed=0, num_crops=4, **overrides):
        key = (name, seed, num_crops, json.dumps(overrides, sort_keys=True))
        if key not in made:
            cfg = vision_config(name, **overrides)
            ref = RefVision(torch_mod, transformers_mod, cfg, seed)
            folder = ref.save(tmp_path_factory.mktemp("phi3v"), cfg, num_crops)
            made[key] = (folder, ref)
        return made[key]

    return build


# ------------------------------------------------------------------------------ preprocessing


def _images(tmp_path):
    jpeg = tmp_path / "photo.jpg"
    photo(640, 427, seed=3).save(jpeg, quality=85)
    rgba = photo(333, 500, seed=4).convert("RGBA")
    rgba.putalpha(128)
    return {
        "landscape photo": photo(1024, 683, seed=1),
        "portrait photo": photo(480, 1100, seed=2),
        "jpeg file": jpeg,
        "screenshot 16:9": screenshot(1280, 720),
        "tall screenshot": screenshot(390, 844),
        "palette png": palette_png(tmp_path / "palette.png"),
        "tiny": photo(7, 5, seed=6),
        "grey": photo(300, 300, seed=7).convert("L"),
        "rgba": rgba,
        "panorama": photo(2000, 150, seed=8),
    }


@pytest.mark.parametrize("num_crops", [16, 4])
def test_preprocess_matches_reference(tmp_path, torch_mod, num_crops):
    from PIL import Image

    for name, src in _images(tmp_path).items():
        img = Image.open(src) if not isinstance(src, Image.Image) else src
        ours = preprocess([src], num_crops)
        pv, sizes, tokens = ref_preprocess(torch_mod, [img], num_crops)
        assert ours.pixel_values.shape == tuple(pv.shape) == (1, num_crops + 1, 3, CROP, CROP), name
        err = np.abs(ours.pixel_values - pv.numpy()).max()
        assert err <= PIX_TOL, f"{name}: max |dpixel| {err}"
        assert ours.image_sizes.tolist() == sizes, name
        assert ours.num_img_tokens == tokens, name
        h, w = sizes[0]
        assert hd_size(*img.size, num_crops) == (h, w)
        assert (h // CROP) * (w // CROP) <= num_crops


def test_token_count_formula():
    # ((h//336)*(w//336) + 1) * 144 + 1 + (h//336 + 1) * 12
    assert image_tokens(1344, 1344) == 17 * 144 + 1 + 5 * 12 == 2509
    assert image_tokens(336, 672) == 3 * 144 + 1 + 2 * 12
    assert image_tokens(672, 336) == 3 * 144 + 1 + 3 * 12


def test_bicubic_matches_torch(torch_mod):
    """On white noise (harder than any image: neighbours differ by ~1.4) torch's own float32 rounding
    shows at ~3e-6 of the value range; images (test above) stay within 1e-5 absolute."""
    x = np.random.default_rng(0).normal(size=(3, 45, 70)).astype(np.float32)
    for oh, ow in ((336, 336), (20, 90), (45, 70)):
        ref = torch_mod.nn.functional.interpolate(torch_mod.from_numpy(x)[None], size=(oh, ow), mode="bicubic",
                                                  align_corners=False)[0].numpy()
        assert np.abs(bicubic_resize(x, oh, ow) - ref).max() <= 3e-6 * np.abs(x).max() * 2


def test_portrait_and_landscape_grids():
    assert hd_size(700, 300, 4) == (336, 672)  # one row of two crops
    assert hd_size(300, 800, 4) == (672, 336)  # the transposed case: two rows of one crop
    assert hd_size(500, 450, 4) == (672, 672)  # 2 x 2
    assert hd_size(1000, 1000, 16) == (1344, 1344)


# ------------------------------------------------------------------------------ model parity


def _ours_vs_ref(folder, ref, torch_mod, prompt, images, num_crops=None):
    model, proc = load(folder)
    assert isinstance(proc, Processor)
    inputs = proc(prompt, images, num_crops=num_crops)
    pv_ref, sizes_ref, tokens_ref = ref_preprocess(torch_mod, [i for i in images], num_crops or proc.settings.num_crops)
    assert np.abs(inputs["pixel_values"] - pv_ref.numpy()).max() <= PIX_TOL
    assert inputs["image_sizes"].tolist() == sizes_ref and inputs["num_img_tokens"] == tokens_ref
    ours_feats = model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
    ref_feats = ref.image_features(pv_ref, sizes_ref)
    for o, r in zip(ours_feats, ref_feats):
        assert o.shape == tuple(r.shape)
        assert np.abs(np.array(o) - r.numpy()).max() <= 1e-4
    ids = inputs["input_ids"]
    rows = place_rows(ids.tolist(), ours_feats)
    logits = np.array(model(mx.array(ids), image_rows=rows))
    embeds = ref.embeds(ids, ref_feats)
    ref_logits = ref.logits(embeds)
    err = np.abs(logits - ref_logits).max()
    assert err <= TOL, f"max |dlogit| {err}"
    return model, proc, inputs, rows, embeds


def test_one_image_several_crops_per_row(vision_ckpt, torch_mod):
    """A landscape image whose crops share a row (the case a known port scrambles) and a 2x2 grid."""
    folder, ref = vision_ckpt()
    for img in (photo(700, 300, seed=11), photo(500, 450, seed=12)):
        _ours_vs_ref(folder, ref, torch_mod, "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n", [img])


def test_crop_order_matters(vision_ckpt, torch_mod):
    """Swapping two sub-crops in a row changes the features: the comparison above can see the order."""
    folder, ref = vision_ckpt()
    model, proc = load(folder)
    inputs = proc("<|image_1|>", [photo(700, 300, seed=11)])
    pv = inputs["pixel_values"].copy()
    a = np.array(model.encode_images(pv, inputs["image_sizes"])[0])
    pv[0, [1, 2]] = pv[0, [2, 1]]
    b = np.array(model.encode_images(pv, inputs["image_sizes"])[0])
    assert np.abs(a - b).max() > 1e-2


def test_two_images_portrait_and_landscape(vision_ckpt, torch_mod):
    folder, ref = vision_ckpt()
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two pictures.<|end|>\n<|assistant|>\n"
    _ours_vs_ref(folder, ref, torch_mod, prompt, [photo(300, 800, seed=13), screenshot(900, 400)])


def test_greedy_generation_equal(vision_ckpt, torch_mod):
    folder, ref = vision_ckpt()
    prompt = "<|user|>\n<|image_1|>\nDescribe it.<|end|>\n<|assistant|>\n"
    model, proc, inputs, rows, embeds = _ours_vs_ref(folder, ref, torch_mod, prompt, [photo(640, 480, seed=14)])
    ours = [t for t, _ in generate_step(inputs["input_ids"][0].tolist(), model, max_tokens=10, image_rows=rows,
                                        prefill_step_size=200)]
    assert ours == ref.greedy(embeds, 10)


def test_long_rope_regime_with_images(vision_ckpt, torch_mod):
    """A prompt past original_max_position_embeddings takes the long factors (Phi-3.5-vision's lists)."""
    folder, ref = vision_ckpt("Phi-3.5-vision-instruct", original_max_position_embeddings=512)
    prompt = "<|user|>\n<|image_1|>\nAnd this?<|end|>\n<|assistant|>\n"
    model, proc, inputs, rows, embeds = _ours_vs_ref(folder, ref, torch_mod, prompt, [photo(500, 450, seed=15)])
    assert inputs["input_ids"].shape[1] > 512
    ours = [t for t, _ in generate_step(inputs["input_ids"][0].tolist(), model, max_tokens=6, image_rows=rows,
                                        prefill_step_size=128)]
    assert ours == ref.greedy(embeds, 6)


def test_processor_ids_match_chunked_tokenizer(vision_ckpt, transformers_mod):
    folder, _ = vision_ckpt()
    _, proc = load(folder)
    hf = transformers_mod.AutoTokenizer.from_pretrained(str(folder))
    prompt = "<|user|>\nFirst <|image_1|> then <|image_2|>, and text after.<|end|>\n<|assistant|>\n"
    imgs = [photo(400, 300, seed=1), photo(300, 400, seed=2)]
    out = proc(prompt, imgs)
    n1, n2 = out["num_img_tokens"]
    want = (hf("<|user|>\nFirst ").input_ids + [-1] * n1 + hf(" then ").input_ids + [-2] * n2
            + hf(", and text after.<|end|>\n<|assistant|>\n").input_ids)
    assert out["input_ids"][0].tolist() == want
    assert want.count(1) == 3  # every chunk starts with the BOS, as the original processor gives


def test_real_checkpoint_names_load():
    """Every tensor of the real Phi-3-vision-128k checkpoint is a parameter of ours (shapes aside)."""
    with gzip.open(DATA / "vision" / "model.safetensors.index.json.gz") as f:
        names = set(json.load(f)["weight_map"])
    cfg = reference_config("Phi-3-vision-128k-instruct")
    cfg.update(hidden_size=128, intermediate_size=64, vocab_size=64)  # 32 heads of 4
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], short_factor=[1.0] * 2, long_factor=[1.0] * 2)
    cfg["vision_config"] = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2)
    cfg["img_processor"] = dict(cfg["img_processor"], image_dim_out=16)
    ours = {k for k, _ in tree_flatten(build_model(parse_config(cfg)).parameters())}
    assert ours == names


# ------------------------------------------------------------------------------ bad input


def test_placeholder_problems_named_at_once():
    with pytest.raises(Phi3MLXError) as e:
        image_order("<|image_1|> <|image_1|> <|image_3|>", 2)
    msg = str(e.value)
    assert "<|image_1|> repeats" in msg and "<|image_3|>" in msg and "image 2 given" in msg
    with pytest.raises(Phi3MLXError, match="no image given"):
        image_order("<|image_1|>", 0)
    with pytest.raises(Phi3MLXError, match="has no <\\|image_1\\|>"):
        image_order("no placeholder", 1)
    assert image_order("<|image_2|> <|image_1|>", 2) == [2, 1]


def test_unreadable_images(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    trunc = tmp_path / "cut.jpg"
    photo(200, 200).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:300])
    for src, needle in ((tmp_path / "missing.png", "image not found"), (bad, "not an image in a format"),
                        (trunc, "unreadable image"), (tmp_path, "is a folder")):
        with pytest.raises(Phi3MLXError, match=needle):
            preprocess([src], 4)


def test_bad_vision_config():
    cfg = vision_config()
    cfg["embd_layer"] = dict(cfg["embd_layer"], hd_transform_order="glb_sub")
    cfg["vision_config"]["hidden_act"] = "gelu"
    cfg["img_processor"]["image_dim_out"] = 33
    with pytest.raises(Phi3MLXError) as e:
        parse_config(cfg)
    msg = str(e.value)
    assert "hd_transform_order" in msg and "hidden_act" in msg and "image_dim_out 33" in msg


# ------------------------------------------------------------------------------ generate / chat


def _cli(capsys, *args):
    from phi3mlx.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_image_equals_python(vision_ckpt, tmp_path, capsys):
    from phi3mlx.generate import generate

    folder, _ = vision_ckpt()
    img = tmp_path / "p.png"
    photo(640, 300, seed=21).save(img)
    code, out, err = _cli(capsys, "generate", "--model", folder, "--image", img, "--prompt", "What is this?",
                          "--max-tokens", 6)
    assert code == 0, err
    model, proc = load(folder)
    prompt = proc.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is this?"}],
                                      add_generation_prompt=True, tokenize=False)
    assert out.rstrip("\n") == generate(model, proc, prompt, max_tokens=6, images=[str(img)])


def test_chat_image_rows_cached_and_reused(vision_ckpt):
    """A chat turn with an image answers as generate does (itself checked against the reference); the
    next turn reuses the image from the cache and still answers as a fresh generate over the history."""
    from phi3mlx.chat import Chat
    from phi3mlx.generate import generate

    folder, _ = vision_ckpt()
    model, proc = load(folder)
    chat = Chat(model, proc, max_tokens=4)
    img = photo(500, 450, seed=22)
    chat.add_image(img)
    first = chat.ask("What is it?", lambda s: None)
    turn1 = [{"role": "user", "content": "<|image_1|>\nWhat is it?"}]
    prompt = proc.apply_chat_template(turn1, add_generation_prompt=True, tokenize=False)
    assert first.text == generate(model, proc, prompt, max_tokens=4, images=[img])
    n_img = chat.images[0].tokens
    second = chat.ask("And the colours?", lambda s: None)
    assert chat.last.cached_tokens > n_img  # the image was not processed again
    assert chat.cache.image_rows.shape[0] == n_img
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    prompt = proc.apply_chat_template(turn2, add_generation_prompt=True, tokenize=False)
    assert second.text == generate(model, proc, prompt, max_tokens=4, images=[img])


def test_chat_image_command_and_bad_path(vision_ckpt, tmp_path, monkeypatch, capsys):
    import io
    import sys

    folder, _ = vision_ckpt()
    img = tmp_path / "c.jpg"
    photo(300, 300, seed=23).save(img)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path / 'nope.png'}\n/image {img}\nWhat is it?\n"))
    code, out, err = _cli(capsys, "chat", "--model", folder, "--max-tokens", 3)
    assert code == 0
    assert "image not found" in err and "image 1 (" in err
    assert len(out.strip().splitlines()) == 1


def test_cli_image_errors(vision_ckpt, hf_checkpoint, tmp_path, capsys):
    from .helpers import assert_error

    folder, _ = vision_ckpt()
    text_folder, _ = hf_checkpoint("Phi-3-mini-4k-instruct")
    small, _ = vision_ckpt(max_position_embeddings=1024, original_max_position_embeddings=512)
    capsys.readouterr()
    img = tmp_path / "a.png"
    photo(400, 300, seed=24).save(img)
    code, _, err = _cli(capsys, "generate", "--model", folder, "--image", tmp_path / "missing.png", "--prompt", "hi")
    assert_error(code, err, "image not found", "missing.png")
    code, _, err = _cli(capsys, "generate", "--model", folder, "--image", img, "--prompt", "<|image_2|> hi")
    assert_error(code, err, "<|image_2|>", "image 1 given")
    code, _, err = _cli(capsys, "generate", "--model", folder, "--prompt", "<|image_1|> hi")
    assert_error(code, err, "<|image_1|>", "no image given")
    code, _, err = _cli(capsys, "generate", "--model", text_folder, "--image", img, "--prompt", "hi")
    assert_error(code, err, "takes no images")
    notimg = tmp_path / "x.gif"
    notimg.write_bytes(b"GIF89a garbage")
    code, _, err = _cli(capsys, "generate", "--model", folder, "--image", notimg, "--prompt", "hi")
    assert_error(code, err, "x.gif")
    code, _, err = _cli(capsys, "generate", "--model", small, "--image", img, "--image", img, "--prompt", "two")
    assert_error(code, err, "2 image(s) takes", "context is 1024")


# ------------------------------------------------------------------------------ convert / export


def test_convert_export_round_trip_exact(vision_ckpt, tmp_path):
    from safetensors.numpy import load_file

    from phi3mlx.convert.hf_to_mlx import convert
    from phi3mlx.convert.mlx_to_hf import export_hf

    folder, ref = vision_ckpt()
    mlx_dir, hf_dir = tmp_path / "mlx", tmp_path / "hf"
    convert(str(folder), str(mlx_dir), show_progress=False)
    assert (mlx_dir / "preprocessor_config.json").exists()
    mlx_w = load_file(str(next(mlx_dir.glob("*.safetensors"))))
    patch = "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight"
    assert mlx_w[patch].shape == (32, 14, 14, 3)  # channels-last, as mlx-vlm stores it
    export_hf(str(mlx_dir), str(hf_dir), show_progress=False)
    back = {}
    for f in hf_dir.glob("*.safetensors"):
        back.update(load_file(str(f)))
    orig = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(back) == set(orig)
    for k, v in orig.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Phi3VForCausalLM"]
    # the converted folder loads and gives the same image rows as the original
    img = photo(700, 300, seed=31)
    outs = []
    for d in (folder, mlx_dir, hf_dir):
        model, proc = load(d)
        inp = proc("<|image_1|>", [img])
        outs.append(np.array(model.encode_images(inp["pixel_values"], inp["image_sizes"])[0]))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_quantize_keeps_vision_float_unless_asked(vision_ckpt, tmp_path, capsys):
    from phi3mlx.convert.hf_to_mlx import convert

    folder, _ = vision_ckpt()
    img = photo(700, 300, seed=32)
    rows = {}
    for name, qv in (("float", None), ("q", False), ("qv", True)):
        out = tmp_path / name
        if qv is None:
            convert(str(folder), str(out), show_progress=False)
        else:
            convert(str(folder), str(out), quantize=True, q_group_size=32, quantize_vision=qv, show_progress=False)
        model, proc = load(out)
        inp = proc("<|image_1|>", [img])
        rows[name] = np.array(model.encode_images(inp["pixel_values"], inp["image_sizes"])[0])
        cfg = json.loads((out / "config.json").read_text())
        if qv is False:
            assert cfg["quantization"]["model.vision_embed_tokens.img_projection.0"] is False
            assert "model.layers.0.self_attn.qkv_proj" not in cfg["quantization"]  # the language model is quantized
    assert np.array_equal(rows["float"], rows["q"])
    assert not np.array_equal(rows["float"], rows["qv"])
    code, _, err = _cli(capsys, "convert", "--hf-path", folder, "--mlx-path", tmp_path / "x", "--quantize-vision")
    assert code == 1 and "--quantize-vision applies only when quantizing" in err


# ------------------------------------------------------------------------------ LoRA on images


def test_lora_on_image_rows(vision_ckpt, tmp_path, capsys):
    """Adapters on the language model learn from image+text rows (vision frozen); the loss falls and the
    adapted model loads and answers with the image."""
    from phi3mlx.finetune import data as D

    folder, _ = vision_ckpt(num_crops=1)  # one crop per image: short sequences
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rows = []
    for i in range(6):
        photo(500 + 40 * i, 300, seed=40 + i).save(data / "img" / f"{i}.png")
        rows.append({"messages": [{"role": "user", "content": "What colour dominates?"},
                                  {"role": "assistant", "content": f"Mostly colour number {i}."}],
                     "images": [f"img/{i}.png"]})
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = _cli(capsys, "lora", "--model", folder, "--data", data, "--adapter-path", tmp_path / "ad",
                          "--iters", 16, "--batch-size", 1, "--lr", "5e-3", "--report-every", 4, "--save-every", 16)
    assert code == 0, err
    assert "encoding 6 image(s)" in err
    metrics = [json.loads(line) for line in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] - 1.0, losses  # over a nat learnt in 16 steps
    model, proc = load(folder, adapter_path=str(tmp_path / "ad"))
    table = D.ImageTable(model, proc)
    row = D.Row(rows[0])
    row.file = str(data / "train.jsonl")
    ids, mask = D.encode_sft_images(row, proc, table)
    assert sum(1 for t in ids if t < 0) == table.rows[0].shape[0]  # the image's positions, all of them
    assert all(m == 0 for t, m in zip(ids, mask) if t < 0)  # never a target


def test_lora_image_rows_bad_input(vision_ckpt, hf_checkpoint, tmp_path, capsys):
    from .helpers import assert_error

    folder, _ = vision_ckpt()
    text_folder, _ = hf_checkpoint("Phi-3-mini-4k-instruct")
    capsys.readouterr()
    data = tmp_path / "d"
    data.mkdir()
    photo(300, 200).save(data / "ok.png")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "images": ["ok.png"]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "images": ["gone.png"]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "images": "ok.png"}]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = _cli(capsys, "lora", "--model", folder, "--data", data, "--iters", 1, "--batch-size", 1)
    assert_error(code, err, "train.jsonl:2", "gone.png", "train.jsonl:3", "not a list of image paths")
    (data / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    code, _, err = _cli(capsys, "lora", "--model", text_folder, "--data", data, "--iters", 1, "--batch-size", 1)
    assert_error(code, err, "takes no images")


def test_bench_image_runs_on_a_vision_folder(vision_ckpt):
    from phi3mlx.bench_vision import print_image_report, run_image_bench

    folder, _ = vision_ckpt(num_crops=1)
    res = run_image_bench(str(folder), num_crops=1, gen_tokens=3, repeats=1, compare_mlx_vlm=False)
    r = res["engines"]["phi3mlx"]
    assert r["encode_s"] > 0 and r["prefill_s"] >= 0 and len(r["tokens"]) == 3
    assert res["image_tokens"] == [image_tokens(*res["image_sizes"][0])]
    print_image_report(res)


def test_bench_image_refuses_a_text_model(hf_checkpoint):
    from phi3mlx.bench_vision import run_image_bench

    folder, _ = hf_checkpoint("Phi-3-mini-4k-instruct")
    with pytest.raises(Phi3MLXError, match="needs a vision model"):
        run_image_bench(str(folder), compare_mlx_vlm=False, gen_tokens=2, repeats=1)


def test_image_from_url(tmp_path):
    """http(s) images are read (a local server stands in for the web); a failed download is one line."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    photo(120, 80, seed=50).save(tmp_path / "web.png")
    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        got = preprocess([f"{url}/web.png"], 4)
        assert np.array_equal(got.pixel_values, preprocess([tmp_path / "web.png"], 4).pixel_values)
        with pytest.raises(Phi3MLXError, match="cannot download the image"):
            preprocess([f"{url}/missing.png"], 4)
    finally:
        server.shutdown()


def test_bad_preprocessor_config(tmp_path):
    from phi3mlx.processor import ProcessorSettings

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"num_crops": 0, "image_std": [0.2, 0, 0.3]}))
    with pytest.raises(Phi3MLXError) as e:
        ProcessorSettings.read(tmp_path)
    assert "num_crops" in str(e.value) and "image_std" in str(e.value)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(Phi3MLXError, match="not valid JSON"):
        ProcessorSettings.read(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"num_crops": 4}))
    assert ProcessorSettings.read(tmp_path).num_crops == 4


def test_review_fixes(vision_ckpt, tmp_path, monkeypatch, capsys):
    """Repetition penalty ignores image positions; a typed placeholder is a notice, not the end of the chat;
    --pack is refused with image rows; an id prompt with image positions needs its rows."""
    import io
    import sys

    from phi3mlx.generate import generate

    folder, _ = vision_ckpt()
    model, proc = load(folder)
    img = photo(400, 300, seed=60)
    prompt = "<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n"
    out = generate(model, proc, prompt, images=[img], max_tokens=4, repetition_penalty=1.3)
    assert isinstance(out, str)
    with pytest.raises(Phi3MLXError, match="image positions but 0 image rows"):
        list(generate_step([1, -5, -5, 2], model, max_tokens=1))
    img_path = tmp_path / "i.png"
    img.save(img_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"<|image_1|> what?\n/image {img_path}\nWhat is it?\n"))
    code, out, err = _cli(capsys, "chat", "--model", folder, "--max-tokens", 2)
    assert code == 0 and "placeholders are added for you" in err
    assert len(out.strip().splitlines()) == 1
    data = tmp_path / "d"
    data.mkdir()
    img.save(data / "a.png")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "images": ["a.png"]}
    (data / "train.jsonl").write_text(json.dumps(row) + "\n")
    code, _, err = _cli(capsys, "lora", "--model", folder, "--data", data, "--iters", 1, "--batch-size", 1, "--pack")
    assert code == 1 and "--pack does not work with image rows" in err


def test_server_takes_image_url_parts(vision_ckpt, tmp_path):
    """``phi3mlx serve`` with a vision model: image_url parts (a data: URL and a file path) answer as
    generate does with the same images; a text model refuses image parts with a 400."""
    import base64
    import io

    import openai

    from phi3mlx.generate import generate
    from phi3mlx.server import Server

    from .test_serve import Running

    folder, _ = vision_ckpt()
    model, proc = load(folder)
    img = photo(500, 450, seed=23)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "img.png"
    img.save(path)
    r = Running(Server(model, proc, "vision", image_dir=str(tmp_path)))
    try:
        c = r.client(key="none")
        prompt = proc.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is it?"}],
                                          add_generation_prompt=True, tokenize=False)
        expected = generate(model, proc, prompt, max_tokens=5, images=[img])
        for url in (data_url, str(path)):
            resp = c.chat.completions.create(model="vision", temperature=0, max_tokens=5, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}])
            assert resp.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="image file not found"):
            c.chat.completions.create(model="vision", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "no.png")}}]}])
    finally:
        r.close()
    text_model, tok = load("phi3mlx:embedded")
    r = Running(Server(text_model, tok, "text"))
    try:
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            r.client(key="none").chat.completions.create(model="text", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}])
    finally:
        r.close()
