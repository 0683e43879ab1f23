"""Shared fixtures: tiny random mlx-lm models for every architecture in the table."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=128,
    tie_word_embeddings=False,
)

TINY_CONFIGS = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16, max_position_embeddings=512, rope_theta=10000.0),
    "granite": dict(
        _COMMON,
        logits_scaling=2.0,
        attention_multiplier=0.25,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        max_position_embeddings=512,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=10000.0,
    ),
    "smollm3": dict(_COMMON, no_rope_layer_interval=4),
    "cohere": dict(_COMMON, layer_norm_eps=1e-5, logit_scale=0.5),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16),
    "gemma3_text": dict(_COMMON, head_dim=16, sliding_window=16, sliding_window_pattern=2),
    "phi3": dict(_COMMON),
    "phi": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    ),
    "gpt2": dict(n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_positions=128, layer_norm_epsilon=1e-5, vocab_size=128),
    "gpt_neox": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        vocab_size=128,
        layer_norm_eps=1e-5,
        rotary_emb_base=10000,
        rotary_pct=0.25,
        max_position_embeddings=128,
    ),
    "starcoder2": dict(_COMMON),
    "qwen3_moe": dict(
        _COMMON,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        moe_intermediate_size=32,
        rope_theta=10000.0,
        max_position_embeddings=512,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, rope_theta=10000.0),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, intermediate_size=32),
}


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random float32 mlx-lm model of ``model_type``."""
    from mlx_lm.utils import _get_classes

    config = {"model_type": model_type, **TINY_CONFIGS[model_type], **overrides}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Norm weights and biases start constant; randomise them so no test passes by symmetry.
    model.update(
        tree_map_with_path(
            lambda path, p: p + 0.1 * mx.random.normal(p.shape) if p.ndim == 1 else p,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    return model


def save_tiny_model(model, path, config: dict, tokenizer_dir=None):
    """Write ``model`` as an mlx-lm folder (config.json + model.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny():
    return tiny_model


def tiny_input(seed=1, batch=2, length=12, vocab=128):
    return mx.random.randint(0, vocab, (batch, length), key=mx.random.key(seed))


EXAMPLE_DATA = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "data"


def train_tiny_tokenizer(path, vocab_size=384):
    """A byte-level BPE tokenizer trained offline on the example data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [json.loads(l)["text"] for l in (EXAMPLE_DATA / "train.jsonl").open()]
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An mlx-lm folder: tiny llama (vocab 384) + a BPE tokenizer, loadable by mlx_lm.load."""
    path = tmp_path_factory.mktemp("tiny_llama")
    config = {"model_type": "llama", **TINY_CONFIGS["llama"], "vocab_size": 384}
    model = tiny_model("llama", vocab_size=384)
    save_tiny_model(model, path, config)
    train_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A small slice of the example data: quick to tokenize and train on."""
    path = tmp_path_factory.mktemp("tiny_data")
    for split, n in (("train", 48), ("valid", 8), ("test", 8)):
        lines = (EXAMPLE_DATA / f"{split}.jsonl").read_text().splitlines()[:n]
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A saved gain-ffn adapter for the tiny llama (gains at 1)."""
    from mlx_lm import load

    from gain_mlx import adapter as A

    model, _ = load(str(tiny_model_dir))
    targets = A.apply_gains(model, "gain-ffn")
    path = tmp_path_factory.mktemp("adapter") / "a"
    A.save_adapter(model, path, A.adapter_config(model, targets, "gain-ffn", False))
    return path


# Core tests that run under both device policies (gain_mlx.policy) and must pass alike:
# "gpu" forces the plain MLX path on this CPU, with float32 compute (fp16 matmuls are
# ~100x slower here). tests/test_policy.py compares the two policies' numbers.
# The whole suite runs under one policy with GAIN_MLX_POLICY=gpu GAIN_MLX_DTYPE=float32.
POLICY_ENV = {"cpu": {"GAIN_MLX_POLICY": "cpu"}, "gpu": {"GAIN_MLX_POLICY": "gpu", "GAIN_MLX_DTYPE": "float32"}}
BOTH_POLICIES = {
    "test_train.py::test_training_lowers_loss_and_saves_adapter",
    "test_train.py::test_quantized_folder_trains_through_float_copy",
    "test_monitor.py::test_evaluate_loss_equals_mlx_lm_default_loss",
    "test_loss.py::test_evaluation_loss_equals_the_training_loss",
    "test_probe.py::test_score_matches_one_sequence_at_a_time",
    "test_fuse.py::test_fused_folder_runs_in_plain_mlx_lm",
    "test_export.py::test_rewrite_without_changes_is_byte_identical",
    "test_serve.py::test_greedy_mixed_batch_equals_fused_generate",
}


def pytest_collection_modifyitems(items):
    """Tests on the real SmolLM2 model are slow too (``pytest -m "not slow"`` leaves them out)."""
    for item in items:
        if item.get_closest_marker("real") is not None:
            item.add_marker(pytest.mark.slow)


def pytest_generate_tests(metafunc):
    name = f"{metafunc.module.__name__.rsplit('.', 1)[-1]}.py::{metafunc.function.__name__}"
    if name in BOTH_POLICIES:
        metafunc.fixturenames.append("device_policy")
        metafunc.parametrize("device_policy", list(POLICY_ENV), indirect=True)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """``publish(folder, repo_id)``: put ``folder`` in a Hub cache under ``tmp_path`` as
    ``repo_id``'s main revision, with the Hub offline (no network is ever reached)."""
    import shutil

    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)

    def publish(folder, repo_id):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return repo_id

    return publish


@pytest.fixture
def device_policy(request, monkeypatch):
    """Run the test under the policy ``request.param`` ("cpu" or "gpu", see POLICY_ENV)."""
    for key in ("GAIN_MLX_POLICY", "GAIN_MLX_DTYPE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in POLICY_ENV[request.param].items():
        monkeypatch.setenv(key, value)
    return request.param
