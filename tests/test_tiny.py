"""Tests for dreambooth_pl.tiny: the offline CLIP tokenizer, the seeded random builder, the cache stamp.

The `tiny-model` command is tested in test_commands.py.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from dreambooth_pl import tiny

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
# Prompts on which HF's CLIPTokenizer and open_clip agree as given (punctuation, case, whitespace, unicode).
AGREE = [
    "a sks can",
    "a photo of a sks dog, 4k!",
    "A cube shaped sks backpack on top of a mirror",
    "it's a dog's life, isn't it? hello...world!!! 3.14",
    "  Multiple   spaces\tand\nnewlines  ",
    "café 🐶 naïve Ünïcödé ÀÉÎ 日本語 🎉🚀",
]
# open_clip runs ftfy.fix_text + html.unescape first (its `basic_clean`); HF's CLIPTokenizer does not.
NEEDS_FTFY = [
    "“curly” quotes — dash",
    "&amp; html &lt;tag&gt;",
    "ﬁne ligature",
    "ＦＵＬＬ width",
    "mojibake: schÃ¶n",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")


@pytest.fixture(scope="module")
def oc_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def oc_ids(oc: SimpleTokenizer, text: str) -> list[int]:
    return [oc.sot_token_id, *oc.encode(text), oc.eot_token_id]


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", AGREE)
def test_tokenizer_matches_open_clip(tokenizer, oc_tokenizer, text):
    """The rebuilt CLIPTokenizer gives open_clip's ids (with start/end tokens)."""
    assert tokenizer(text).input_ids == oc_ids(oc_tokenizer, text)


@pytest.mark.parametrize("text", NEEDS_FTFY)
def test_tokenizer_matches_open_clip_after_its_text_cleaning(tokenizer, oc_tokenizer, text):
    """Where they differ it is only open_clip's ftfy/html pre-cleaning: on cleaned text the ids agree."""
    cleaned = whitespace_clean(basic_clean(text))
    assert cleaned != text
    assert tokenizer(cleaned).input_ids == oc_ids(oc_tokenizer, text)


def test_tokenizer_vocabulary_is_open_clips(tokenizer, oc_tokenizer):
    """Same 49408 tokens at the same ids as open_clip (special tokens spelled the OpenAI/HF way)."""
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    expected = {rename.get(tok, tok): i for tok, i in oc_tokenizer.encoder.items()}
    assert tokenizer.get_vocab() == expected


def test_tokenizer_special_tokens_and_padding(tokenizer, oc_tokenizer):
    """vocab 49408, bos 49406, eos = pad 49407, max length 77; max_length padding pads with eos."""
    assert tokenizer.vocab_size == len(tokenizer) == 49408
    assert tokenizer.bos_token_id == oc_tokenizer.sot_token_id == 49406
    assert tokenizer.eos_token_id == oc_tokenizer.eot_token_id == 49407
    assert tokenizer.model_max_length == 77
    enc = tokenizer("a sks can", padding="max_length")
    n = len(oc_ids(oc_tokenizer, "a sks can"))
    assert len(enc.input_ids) == 77
    assert enc.input_ids[:n] == oc_ids(oc_tokenizer, "a sks can")
    assert enc.input_ids[n:] == [49407] * (77 - n)
    assert enc.attention_mask == [1] * n + [0] * (77 - n)


def test_tokenizer_truncates_to_77_ending_with_eos(tokenizer):
    """A long prompt truncates to 77 ids that still end with the end-of-text token."""
    ids = tokenizer("a photo " * 100, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


# ------------------------------------------------------------------------------------------ builder


def test_build_random_is_deterministic(tmp_path):
    """Same seed -> byte-identical weight files; another seed -> a different UNet; no temp folders left."""
    a = tiny.build_random("tiny", tmp_path / "a", seed=0)
    b = tiny.build_random("tiny", tmp_path / "b", seed=0)
    c = tiny.build_random("tiny", tmp_path / "c", seed=1)
    for rel in WEIGHT_FILES:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ua, uc = load_file(a / WEIGHT_FILES[0]), load_file(c / WEIGHT_FILES[0])
    assert ua.keys() == uc.keys()
    assert not all(torch.equal(ua[k], uc[k]) for k in ua)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_tiny_cache_matches_seed_zero_build(tiny_dir, tmp_path):
    """The cached `tiny` model is the seed-0 build (same weights as a fresh build)."""
    fresh = tiny.build_random("tiny", tmp_path / "fresh", seed=0)
    for rel in WEIGHT_FILES:
        assert (fresh / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel


def test_build_random_refuses_a_folder_it_did_not_write(tmp_path):
    """A non-empty folder without the stamp is refused and left as it was."""
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model built by dreambooth_pl"):
        tiny.build_random("tiny", target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_build_random_replaces_its_own_model_whole(tmp_path):
    """Building over a model it wrote (or into an empty folder) swaps in the new model; no leftovers."""
    folder = tmp_path / "m"
    folder.mkdir()
    tiny.build_random("tiny", folder, seed=0)
    (folder / "stale.txt").write_text("from the old build")
    tiny.build_random("tiny-v", folder, seed=1)
    assert not (folder / "stale.txt").exists()
    assert (folder / tiny.STAMP).read_text().split() == ["tiny-v", str(tiny.TINY_VERSION), "seed=1"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_build_keeps_the_old_model(tmp_path, monkeypatch):
    """A build that fails half-way leaves the previous model untouched and no temporary folder."""
    folder = tiny.build_random("tiny", tmp_path / "m", seed=0)
    before = {rel: (folder / rel).read_bytes() for rel in WEIGHT_FILES}

    def broken(**_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tiny, "UNet2DConditionModel", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        tiny.build_random("tiny", folder, seed=1)
    assert {rel: (folder / rel).read_bytes() for rel in WEIGHT_FILES} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ------------------------------------------------------------------------------------------ cache stamp


def test_tiny_model_path_builds_once_and_rebuilds_on_a_stale_stamp(tmp_path):
    """The cached folder is reused while its stamp names this model and TINY_VERSION, rebuilt otherwise."""
    folder = tiny.tiny_model_path("tiny", root=tmp_path / "cache")
    stamp = folder / tiny.STAMP
    assert stamp.read_text().split() == ["tiny", str(tiny.TINY_VERSION), "seed=0"]
    (folder / "marker").write_text("")
    assert tiny.tiny_model_path("tiny", root=folder) == folder
    assert (folder / "marker").exists()  # reused, not rebuilt
    stamp.write_text(f"tiny {tiny.TINY_VERSION - 1} seed=0\n")
    tiny.tiny_model_path("tiny", root=folder)
    assert not (folder / "marker").exists()  # an older builder's cache is rebuilt
    assert stamp.read_text().split()[:2] == ["tiny", str(tiny.TINY_VERSION)]
    (folder / "marker").write_text("")
    tiny.tiny_model_path("tiny-v", root=folder)
    assert not (folder / "marker").exists()  # another model's cache is rebuilt
    assert stamp.read_text().split()[:2] == ["tiny-v", str(tiny.TINY_VERSION)]


def test_tiny_model_path_defaults_to_the_project_cache(model_cache, tiny_dir):
    """Without `root` the model lives in `$DREAMBOOTH_PL_CACHE/models/<name>`."""
    assert tiny.tiny_model_path("tiny") == tiny_dir == model_cache / "models" / "tiny"


def test_build_random_leaves_the_global_random_stream_alone(tmp_path):
    # A fit that builds `tiny` on first use must make the same steps as one that finds it cached.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny.build_random(tiny.TINY, tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", [tiny.TINY_SD3, tiny.TINY_FLUX])
def test_tiny_flow_models_build_deterministically_and_sample_through_their_pipelines(name, tmp_path):
    """Built offline, seeded (two builds: the same bytes), saved by their pipelines and loaded back with diffusers'
    plain from_pretrained; a 2-step 64 px sample."""
    from diffusers import DiffusionPipeline

    a, b = tiny.build_random(name, tmp_path / "a"), tiny.build_random(name, tmp_path / "b")
    for f in sorted(a.rglob("*.safetensors")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f
    pipe = DiffusionPipeline.from_pretrained(a)
    assert type(pipe).__name__ == ("StableDiffusion3Pipeline" if name == tiny.TINY_SD3 else "FluxPipeline")
    image = pipe("a sks dog", num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=77).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_the_offline_t5_tokenizer_reads_words_whole_and_ends_with_eos(tmp_path):
    clip = tiny.write_clip_tokenizer(tmp_path / "clip")
    tok = tiny.build_t5_tokenizer(tmp_path / "t5", clip / "vocab.json")
    ids = tok("a photo of a dog").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁dog", "</s>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("sks").input_ids)[-1] == "</s>"  # a rare word: pieces, never unknown
    assert 2 not in tok("sks zwx").input_ids
