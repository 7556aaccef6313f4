import hashlib

from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.builtin import ensure_builtin


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_llm_is_a_real_hf_checkpoint(data_dir):
    folder = ensure_builtin("tiny-llm", data_dir / "models")
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert model.config.model_type == "llama"
    text = "héllo wörld, 日本語 🎉"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = list(chat["input_ids"])
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_builds_are_deterministic(data_dir, tmp_path):
    first = ensure_builtin("tiny-llm", data_dir / "models")
    second = ensure_builtin("tiny-llm", tmp_path / "models")
    assert digest(first / "model.safetensors") == digest(second / "model.safetensors")
    assert digest(first / "tokenizer.json") == digest(second / "tokenizer.json")


def test_tiny_sd_is_a_real_diffusers_pipeline_folder(data_dir):
    from diffusers import StableDiffusionPipeline

    folder = ensure_builtin("tiny-sd", data_dir / "models")
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, use_safetensors=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    ids = pipe.tokenizer("a photo of an astronaut riding a horse")["input_ids"]
    assert pipe.tokenizer.unk_token_id not in ids[1:-1], "every word maps to real tokens"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_a_model_built_by_an_older_recipe_is_built_again(data_dir, tmp_path):
    from shared.builtin import BUILD_STAMP

    folder = ensure_builtin("tiny-llm", tmp_path / "models")
    (folder / BUILD_STAMP).write_text("0")  # as an earlier release would have left it
    (folder / "model.safetensors").write_bytes(b"stale")
    rebuilt = ensure_builtin("tiny-llm", tmp_path / "models")
    assert rebuilt == folder
    assert digest(rebuilt / "model.safetensors") == digest(
        ensure_builtin("tiny-llm", data_dir / "models") / "model.safetensors"
    )
