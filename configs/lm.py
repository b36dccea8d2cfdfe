r"""Text-only language model on the shared trainer (the LLM of every unified model).

Variants, chosen by the text after the colon:
  configs/lm.py:tiny   tests: byte-level 2-layer model, 64-token rows, a few steps.
  configs/lm.py:demo   a byte-level 4-layer model on the built-in CPython corpus, ~5 min on
                       2 CPU cores; prints held-out loss and a sample at the start and end.
  configs/lm.py:tiny,moe   after a size: a mixture-of-experts LM (Bailing MoE / Ling-style:
                       layer 0 dense, the others 8 routed SwiGLU experts of a quarter of
                       intermediate_size, top-2, plus 1 shared expert). The LM task trains
                       it without the router balance loss (the MLLM task weights it).
  configs/lm.py:qwen2_5_7b   Qwen2.5-7B's shape (28 layers, hidden 3584, 28/4 heads, MLP
                       18944, vocab 152064, q/k/v bias, untied head), bf16 compute, scanned
                       and rematerialised layers, 4096-token rows, batch 256: for
                       `--mode=plan`, or for training with --config.data.tokenizer and
                       weights from `unimm_jax.convert.load_pretrained`.

Text comes from `config.data` (unimm_jax/data/text_data_config.py): the built-in corpus,
JSONL or a folder of text files, tokenized by the byte tokenizer or an HF tokenizer.json
directory (`--config.data.tokenizer=/ckpt/Qwen2.5-0.5B`). The model fields are those of
`unimm_jax.models.llm.LLMConfig`; vocab_size 0 takes the tokenizer's.

  python -m unimm_jax.main --config=configs/lm.py:demo --workdir=/tmp/lm
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.data import text_data_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the LM config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "lm"
  config.data = text_data_config.default_text_data_config()
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=0,
      hidden_size=256,
      intermediate_size=688,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=0,  # 0 = hidden_size // num_heads
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
      qkv_bias=False,  # Qwen2
      qk_norm="",  # '' | 'rms' (Qwen3) | 'chameleon'
      tie_word_embeddings=True,
      dtype="float32",
      scan_layers=False,
      remat=False,
      attention_impl="xla",  # jax.nn.dot_product_attention's: 'xla', or 'cudnn' on GPUs
      init_path="",  # a transformers checkpoint (same architecture) a fresh run starts from
      # Mixture of experts (unimm_jax/nn/moe.py, LLMConfig's fields); 0 experts = dense.
      num_experts=0,
      num_experts_per_tok=0,
      moe_intermediate_size=0,
      num_shared_experts=0,
      first_k_dense_replace=0,
      norm_topk_prob=True,
      num_routers=1,  # 3: Bailing's multi_gate (text, image, audio routers)
      moe_dispatch="dense",  # 'dense' | 'ragged' (same result; see unimm_jax/nn/moe.py)
  ))
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.1,
      schedule="cosine", warmup_steps=50, grad_clip=1.0,
      # Parameter groups (unimm_jax/train/optimizers.py): name -> dict(pattern=REGEX over
      # paths such as 'layers_0/mlp/up_proj/kernel', lr_mult, weight_decay, frozen).
      groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0  # eval with the trained params themselves
  config.train.batch_size = 16
  config.train.steps = 600
  config.train.log_every = 25
  config.train.image_every = 200  # text samples (TensorBoard + samples/*.txt)
  config.train.checkpoint_every = 200
  config.train.eval_every = 100
  config.eval.batch_size = 8
  config.eval.num_batches = 4  # held-out rows = batch_size x num_batches at most
  config.eval.prompt_tokens = 48  # the sample continues this many tokens of an eval document
  config.eval.sample_tokens = 64

  return config_defaults.apply_variants(config, arg, _VARIANTS, "configs/lm.py")


def _demo(config):
  config.data.seq_len = 128


def _tiny(config):
  m = config.model
  m.hidden_size, m.intermediate_size, m.num_layers = 32, 64, 2
  m.num_heads, m.num_kv_heads = 4, 2
  config.data.seq_len = 64
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  config_defaults.set_test_schedule(config)
  config.eval.batch_size = 8
  config.eval.num_batches = 1
  config.eval.prompt_tokens = 16
  config.eval.sample_tokens = 8


def _moe(config):
  m = config.model
  m.num_experts, m.num_experts_per_tok, m.num_shared_experts = 8, 2, 1
  m.moe_intermediate_size = max(m.intermediate_size // 4, 8)
  m.first_k_dense_replace = 1


def _qwen2_5_7b(config):
  m = config.model
  m.vocab_size, m.hidden_size, m.intermediate_size = 152064, 3584, 18944
  m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 28, 28, 4, 128
  m.rope_theta, m.qkv_bias, m.tie_word_embeddings = 1e6, True, False
  m.dtype, m.scan_layers, m.remat = "bfloat16", True, True
  config.data.seq_len = 4096
  config.train.batch_size = 256
  config.optim.lr = 3e-5
  config.mesh.data, config.mesh.fsdp = 1, -1  # FSDP over every device


_VARIANTS = {"demo": _demo, "tiny": _tiny, "moe": _moe, "qwen2_5_7b": _qwen2_5_7b}
