"""The prepare step downloads only what the loaders read: one set of safetensors weights per component, in the
variant the entry's dtype wants, and no single-file checkpoints, pickles, EMA copies or duplicate formats.

The file lists are those of the real hub repositories (as `HfApi().list_repo_files` returns them)."""

from __future__ import annotations

import shutil

import pytest

from shared.errors import InvalidArgument
from shared.hub_files import pick_variant, prepared_variant, select_files

SD15_FILES = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_CONFIGS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
]

SD_TURBO_FILES = [
    ".gitattributes",
    "LICENSE.md",
    "README.md",
    "image_quality_one_step.png",
    "model_index.json",
    "output_tile.jpg",
    "prompt_alignment_one_step.png",
    "scheduler/scheduler_config.json",
    "sd_turbo.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
SD_TURBO_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

QWEN_TOKENIZER = ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
QWEN_0_5B_FILES = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    *QWEN_TOKENIZER,
    "model.safetensors",
]
QWEN_3B_FILES = [  # Qwen/Qwen2.5-3B-Instruct: sharded
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    *QWEN_TOKENIZER,
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
]
MISTRAL_FILES = [  # mistralai/Mistral-7B-Instruct-v0.3: the transformers shards and a mistral-inference copy
    ".gitattributes",
    "README.md",
    "config.json",
    "consolidated.safetensors",
    "generation_config.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
    "model.safetensors.index.json",
    "params.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer.model.v3",
    "tokenizer_config.json",
]
LLAMA_FILES = [  # meta-llama/Llama-3.2-1B-Instruct: the original checkpoint in original/
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "original/consolidated.00.pth",
    "original/params.json",
    "original/tokenizer.model",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
PHI3_FILES = [  # microsoft/Phi-3-mini-4k-instruct: remote code
    ".gitattributes",
    "CODE_OF_CONDUCT.md",
    "LICENSE",
    "NOTICE.md",
    "README.md",
    "SECURITY.md",
    "added_tokens.json",
    "config.json",
    "configuration_phi3.py",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "modeling_phi3.py",
    "sample_finetune.py",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]


def test_sd15_in_half_precision_gets_the_fp16_weights_of_the_loaded_components_only():
    variant = pick_variant(SD15_FILES, "float16", SD15_INDEX)
    assert variant == "fp16"
    assert select_files(SD15_FILES, "diffusion", variant, model_index=SD15_INDEX) == sorted(
        [
            *SD15_CONFIGS,
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
    )


def test_sd15_in_full_precision_gets_the_plain_weights_without_ema_pickles_or_checkpoints():
    assert pick_variant(SD15_FILES, "float32", SD15_INDEX) is None
    assert pick_variant(SD15_FILES, "auto", SD15_INDEX) is None
    assert select_files(SD15_FILES, "diffusion", None, model_index=SD15_INDEX) == sorted(
        [
            *SD15_CONFIGS,
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )


def test_without_model_index_every_component_folder_but_the_skipped_ones_is_taken():
    assert select_files(SD15_FILES, "diffusion", "fp16") == select_files(
        SD15_FILES, "diffusion", "fp16", model_index=SD15_INDEX
    )


def test_sd_turbo_skips_its_single_file_checkpoint_and_absent_components():
    tokenizer = [f for f in SD_TURBO_FILES if f.startswith("tokenizer/")]
    configs = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", *tokenizer]
    configs += ["unet/config.json", "vae/config.json"]
    assert pick_variant(SD_TURBO_FILES, "bfloat16", SD_TURBO_INDEX) == "fp16"
    assert select_files(SD_TURBO_FILES, "diffusion", "fp16", model_index=SD_TURBO_INDEX) == sorted(
        [
            *configs,
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
    )
    assert select_files(SD_TURBO_FILES, "diffusion", None, model_index=SD_TURBO_INDEX) == sorted(
        [
            *configs,
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )


def test_fp16_is_picked_only_when_every_weight_component_has_it():
    no_fp16_vae = [f for f in SD_TURBO_FILES if f != "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert pick_variant(no_fp16_vae, "float16", SD_TURBO_INDEX) is None
    # a variant that only some components have: those take it, the rest their plain weights (as diffusers does)
    selected = select_files(no_fp16_vae, "diffusion", "fp16", model_index=SD_TURBO_INDEX)
    assert "vae/diffusion_pytorch_model.safetensors" in selected
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in selected
    assert "unet/diffusion_pytorch_model.safetensors" not in selected


def test_sharded_component_weights_come_with_their_index_in_the_chosen_variant():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.fp16.safetensors",  # the legacy variant naming
        "text_encoder/model-00002-of-00002.fp16.safetensors",
        "text_encoder/model.safetensors.fp16.index.json",
        "text_encoder/model.safetensors",
    ]
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    assert pick_variant(files, "float16", index) == "fp16"
    assert select_files(files, "diffusion", "fp16", model_index=index) == [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.fp16.safetensors",
        "text_encoder/model-00002-of-00002.fp16.safetensors",
        "text_encoder/model.safetensors.fp16.index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    assert select_files(files, "diffusion", None, model_index=index) == [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]


def test_a_pipeline_needs_model_index_and_safetensors_weights():
    with pytest.raises(InvalidArgument, match=r"model_index\.json"):
        select_files(["v1-5-pruned.safetensors"], "diffusion")
    pickled = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
    with pytest.raises(InvalidArgument, match="unet has no safetensors"):
        select_files(pickled, "diffusion", model_index={"unet": ["diffusers", "UNet2DConditionModel"]})


def test_an_llm_with_one_weights_file():
    assert select_files(QWEN_0_5B_FILES, "llm") == sorted(
        ["config.json", "generation_config.json", *QWEN_TOKENIZER, "model.safetensors"]
    )


def test_a_sharded_llm_gets_its_index_and_shards():
    assert select_files(QWEN_3B_FILES, "llm") == sorted(
        [
            "config.json",
            "generation_config.json",
            *QWEN_TOKENIZER,
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]
    )


def test_mistral_skips_the_consolidated_duplicate():
    assert select_files(MISTRAL_FILES, "llm") == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]


def test_subfolders_of_an_llm_repo_are_not_downloaded():
    assert select_files(LLAMA_FILES, "llm") == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_chat_templates_are_kept():
    files = [*QWEN_0_5B_FILES, "chat_template.jinja", "additional_chat_templates/tool_use.jinja", "qwen.tiktoken"]
    selected = select_files(files, "llm")
    assert {"chat_template.jinja", "additional_chat_templates/tool_use.jinja", "qwen.tiktoken"} <= set(selected)


def test_code_is_downloaded_only_when_remote_code_is_trusted():
    plain = [
        "added_tokens.json",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert select_files(PHI3_FILES, "llm") == plain
    code = ["configuration_phi3.py", "modeling_phi3.py", "sample_finetune.py"]
    assert select_files(PHI3_FILES, "llm", trust_remote_code=True) == sorted([*plain, *code])
    custom = [*SD_TURBO_FILES, "pipeline.py", "unet/my_unet.py"]
    assert {"pipeline.py", "unet/my_unet.py"} <= set(select_files(custom, "diffusion", trust_remote_code=True))
    assert not [f for f in select_files(custom, "diffusion") if f.endswith(".py")]


def test_an_llm_without_safetensors_is_refused():
    with pytest.raises(InvalidArgument, match="safetensors"):
        select_files(["config.json", "pytorch_model.bin", "tokenizer.json"], "llm")


def touch(folder, names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()


def test_the_loader_asks_for_the_variant_a_folder_holds_only(tmp_path):
    configs = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
    fp16 = [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    ]
    plain = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    touch(tmp_path / "half", [*configs, *fp16])
    touch(tmp_path / "full", [*configs, *plain])
    touch(tmp_path / "both", [*configs, *plain, *fp16])
    assert prepared_variant(tmp_path / "half") == "fp16"
    assert prepared_variant(tmp_path / "full") is None
    assert prepared_variant(tmp_path / "both") is None


def test_a_pipeline_folder_with_only_fp16_weights_loads(data_dir, tmp_path):
    from shared.builtin import builtin_dir
    from shared.loaders import load_diffusion_pipeline
    from shared.settings import ModelEntry, Settings

    folder = tmp_path / "tiny-sd-fp16"
    shutil.copytree(builtin_dir("tiny-sd", data_dir / "models"), folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".fp16.safetensors"))
    entry = ModelEntry(name="tiny-sd-fp16", kind="diffusion", source=str(folder))
    loaded = load_diffusion_pipeline(entry, Settings.model_validate({"data_dir": data_dir}))
    assert loaded.pipeline.unet is not None and loaded.pipeline.vae is not None


def test_prepare_downloads_the_selected_files_only(monkeypatch, capsys, tmp_path):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile

    from shared.loaders import prepare
    from shared.settings import ModelEntry, Settings

    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    tree = [RepoFile(path=f, size=1_000_000, oid="0") for f in SD15_FILES]
    calls = {}

    def snapshot_download(repo, revision=None, allow_patterns=None):
        calls.update(repo=repo, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", lambda self, *a, **k: iter(tree))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(tmp_path / "model_index.json"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    entry = ModelEntry(name="sd", kind="diffusion", source="hf:sd/sd15@v1", dtype="float16")
    assert prepare(entry, Settings.model_validate({"data_dir": tmp_path})) == str(tmp_path)
    assert calls == {
        "repo": "sd/sd15",
        "revision": "v1",
        "allow_patterns": ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"],
    }
    assert "sd: downloading 3 files (3.0 MB, fp16 weights) from sd/sd15" in capsys.readouterr().out
