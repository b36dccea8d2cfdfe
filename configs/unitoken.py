r"""UniToken (../shared/papers/unitoken.txt): Chameleon VQ codes + any-res SigLIP features of
each image in one Chameleon-style LLM sequence; understanding and generation in one model.

Variants, chosen by the text after the colon (comma-separated, applied in order):
  tiny     tests: a 2-layer LLM, a 1-layer ViT, a random tiny VQ, 4 steps on built-in scenes.
  demo     the README demo: a 4-layer LLM on built-in scenes with the demo VQ tokenizer
           (trained first by configs/chameleon_vqgan.py:demo; launch/demo.sh passes its
           workdir as --config.system.tokenizer_path).
  paper    Chameleon-7B (32 layers, 4096 wide, 65536 ids, q/k LayerNorm) with Chameleon's
           ids, SigLIP-SO400M-14-384 (27 layers, 1152 wide) with the 5 any-res grids, the
           adapter 1152 -> 4096 -> 4096 and the 8192-code VQGAN at 512 px; bf16, scanned and
           rematerialised layers, 4096-token rows, batch 128.
  stage1   LLM frozen; ViT + adapter at lr 1e-3 with the ViT at x1e-2 (1e-5).
  stage2   everything at lr 1e-5 (ViT included).
  Both stages freeze the ViT's patch and position embeddings, use AdamW (0.9, 0.95), weight
  decay 0.1, clip 4, cosine with 1% warmup, dropout 0.05 and z-loss 1e-5 (SPECS 3).
  table5_row1..3   Chameleon's discrete-only encoding (no ViT branch) trained on
                   understanding only / generation only / both;
  table5_row4..6   UniToken without any-res on the same three mixtures;
  table6_row1..4   understanding:generation = 1:1, 2:1, 1:1, 2:1 (rows 3-4 are the paper's
                   10M-example scale: the same ratios, more examples).

Weights: a fresh run starts the LLM from --config.model.init_path (a transformers
`chameleon` directory: Chameleon-7B for `paper`) and SigLIP from --config.vit.init_path (a
`siglip` one: siglip-so400m-patch14-384), each checked against the config's architecture;
the frozen VQ comes from --config.system.tokenizer_path: a tokenizer workdir, a
`chameleon_vqgan` directory or the same `chameleon` one.

  python -m unimm_jax.main --config=configs/unitoken.py:demo --workdir=/tmp/unitoken \
      --config.system.tokenizer_path=/tmp/vq
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.data import mllm_data
from unimm_jax.data import text_tokenizer


def _scene_tokens(num_codes: int, max_size_units: int) -> tuple[ml_collections.ConfigDict, int]:
  """(ids, vocabulary size) for the built-in scenes' word tokenizer: its words first, then
  the image codes, then BOI, EOI, SEP, EOR and the size tokens."""
  words = text_tokenizer.load_tokenizer("scene_words")
  offset = words.vocab_size
  special = offset + num_codes
  return ml_collections.ConfigDict(dict(
      pad=words.pad_id, bos=words.bos_id, eos=words.eos_id, image_offset=offset,
      num_image_codes=num_codes, boi=special, eoi=special + 1, sep=special + 2,
      eor=special + 3, size_base=special + 4)), special + 5 + max_size_units


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the UniToken config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "mllm"
  config.data = mllm_data.default_mllm_data_config()
  config.data.tokenizer = "scene_words"
  config.system = ml_collections.ConfigDict(dict(
      name="unitoken",
      # A tokenizer workdir, the authors' VQGAN .safetensors, or a transformers chameleon /
      # chameleon_vqgan directory; '' = a random VQ (plumbing tests only).
      tokenizer_path="",
      tokenizer_decoder_path="",  # the authors' decoder.* weights for an HF directory
      image_size=32,  # side of the discrete branch's input (px)
      size_unit=8,  # px per size token unit (Chameleon: 32)
      continuous=True,  # the SigLIP branch (False: Chameleon's discrete-only encoding)
      grid_pinpoints=((32, 64), (64, 32), (64, 64)),  # any-res (w, h); () = base tile only
  ))
  config.vq = config_defaults.load_config("configs/chameleon_vqgan.py:demo").model
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # set from config.tokens below
      hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
      head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False,
      qk_norm="chameleon", swin_norm=False, tie_word_embeddings=False, dtype="float32",
      scan_layers=False, remat=False, attention_impl="xla", dropout_rate=0.05,
      init_path=""))  # a transformers `chameleon` directory the LLM of a fresh run starts from
  config.vit = ml_collections.ConfigDict(dict(
      hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256, patch_size=8, image_size=32,
      dtype="float32", scan_layers=False, remat=False,
      init_path=""))  # a transformers `siglip` directory the ViT of a fresh run starts from
  config.adapter_hidden = 256
  config.loss = ml_collections.ConfigDict(dict(z_loss=1e-5))
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.1, schedule="cosine",
      warmup_steps=20, grad_clip=4.0, groups=ml_collections.ConfigDict()))
  _freeze_vit_embeddings(config)
  config.ema_decay = 0.0
  # top_k 0 and top_p 1.0: no filter.
  config.generation = ml_collections.ConfigDict(dict(cfg_scale=3.0, temperature=1.0, top_k=0,
                                                     top_p=1.0))
  config_defaults.set_mllm_schedule(config)
  config = config_defaults.apply_variants(config, arg, _VARIANTS, "configs/unitoken.py")
  _set_scene_tokens(config)
  return config


def _set_scene_tokens(config):
  if config.data.tokenizer == "scene_words":
    units = config.system.image_size // config.system.size_unit
    config.tokens, config.model.vocab_size = _scene_tokens(config.vq.n_embed, units)


def _freeze_vit_embeddings(config):
  """The ViT's patch and position embeddings stay frozen in both stages (SPECS 3)."""
  config.optim.groups.vit_embeddings = dict(
      pattern=r"vit/(patch_embedding|position_embedding)(/.*)?", lr_mult=1.0, weight_decay=0.0,
      frozen=True)


def _tiny(config):
  config.vq = config_defaults.load_config("configs/chameleon_vqgan.py:tiny").model
  config.system.image_size, config.system.size_unit = 32, 16
  config.system.grid_pinpoints = ((16, 32), (32, 16), (32, 32))
  m = config.model
  m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  config.vit.update(dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=8,
                         image_size=16))
  config.adapter_hidden = 32
  config.data.seq_len = 160
  config.data.image_size = 32
  config_defaults.set_mllm_test_schedule(config)


def _demo(config):
  """What 2 CPU cores can teach from scratch in about 13 minutes.

  Everything here starts random (the paper starts from Chameleon-7B and SigLIP), so the
  demo spends its compute on images seen: the base tile only (the any-res grids, tested by
  `tiny` and used by `paper`, would make each example five times as long), an LLM 128 wide
  (at 256 wide half as many images go through in the same time, and grounding did not get
  better per image), and six questions per understanding image (a caption and the five
  question types as one multi-turn conversation), so each image's tokens are read once for
  six answers. With one question per image, 500 steps of the 256-wide LLM answered at the
  majority answer's rate (0.43, chance 0.30): the model had not yet learned to read the
  image. The ViT cuts the 32 px image into 4 px patches (8 x 8 tokens): with 8 px patches a
  small shape (about 5 px) shares its patch with background, and colour questions stayed
  at 0.35 (0.51 with 4 px patches; a ViT probed with direct labels: colour presence 0.82 at
  8 px, 0.98 at 4 px).
  """
  config.system.grid_pinpoints = ()
  config.vit.patch_size = 4
  m = config.model
  m.hidden_size, m.intermediate_size, config.adapter_hidden = 128, 352, 128
  config.data.seq_len, config.data.images_per_row = 512, 4
  config.data.questions_per_image = 6
  config.train.batch_size = 8  # rows of 512 tokens: the 4096 tokens a step of 16 x 256 had
  # Evaluated (and checkpointed) at the start and the end only: each evaluation costs the
  # time of about 25 steps.
  config.train.steps = 950
  config.train.update(dict(image_every=950, checkpoint_every=950, eval_every=950))
  config.eval.update(dict(batch_size=8, num_answers=240))


def _paper(config):
  config.data.tokenizer = ""  # set to the Chameleon checkpoint's tokenizer directory
  config.data.source, config.data.path = "jsonl", ""  # set to the conversations' JSONL files
  config.data.images_per_row = 1
  config.data.image_size = 512
  # The authors cut the discrete ids at 4096 and then insert the continuous tokens; one
  # 768 x 768 any-res image alone is 1 + 2 + 32 x 33 + 1 + 729 + 54 x 55 + 1 = 4760 tokens.
  config.data.seq_len = 5120
  config.system.update(dict(image_size=512, size_unit=32, grid_pinpoints=(
      (384, 768), (768, 384), (768, 768), (384, 1152), (1152, 384))))
  config.vq = config_defaults.load_config("configs/chameleon_vqgan.py:paper").model
  config.tokens = ml_collections.ConfigDict(dict(
      pad=0, bos=0, eos=8710, image_offset=4, num_image_codes=8192, boi=8197, eoi=8196,
      sep=8198, eor=8803, size_base=8804))
  config.model.update(dict(
      vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_layers=32,
      num_heads=32, num_kv_heads=32, dtype="bfloat16", scan_layers=True, remat=True))
  config.vit.update(dict(hidden_size=1152, num_layers=27, num_heads=16, mlp_dim=4304,
                         patch_size=14, image_size=384, dtype="bfloat16", scan_layers=True,
                         remat=True))
  config.adapter_hidden = 4096
  config.train.batch_size = 128
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))


def _stage(lr: float, llm_frozen: bool, vit_mult: float):
  def apply(config):
    config.optim.lr = lr
    config.optim.warmup_steps = max(1, config.train.steps // 100)  # 1% warmup
    if llm_frozen:
      config.optim.groups.llm = dict(pattern=r"llm/.*", lr_mult=1.0, weight_decay=0.1,
                                     frozen=True)
    # Every ViT parameter but the (frozen) patch and position embeddings.
    config.optim.groups.vit = dict(
        pattern=r"vit/(?!patch_embedding|position_embedding).*", lr_mult=vit_mult,
        weight_decay=0.1, frozen=False)
  return apply


def _mixture(understanding: float, generation: float, continuous: bool = True,
             anyres: bool = True):
  def apply(config):
    config.data.understanding_weight = understanding
    config.data.generation_weight = generation
    config.system.continuous = continuous
    if not anyres:
      config.system.grid_pinpoints = ()
  return apply


_VARIANTS = {
    "tiny": _tiny,
    "demo": _demo,
    "paper": _paper,
    "stage1": _stage(1e-3, llm_frozen=True, vit_mult=1e-2),
    "stage2": _stage(1e-5, llm_frozen=False, vit_mult=1.0),
    "table5_row1": _mixture(1.0, 0.0, continuous=False),
    "table5_row2": _mixture(0.0, 1.0, continuous=False),
    "table5_row3": _mixture(1.0, 1.0, continuous=False),
    "table5_row4": _mixture(1.0, 0.0, anyres=False),
    "table5_row5": _mixture(0.0, 1.0, anyres=False),
    "table5_row6": _mixture(1.0, 1.0, anyres=False),
    "table6_row1": _mixture(1.0, 1.0, anyres=False),
    "table6_row2": _mixture(2.0, 1.0, anyres=False),
    "table6_row3": _mixture(1.0, 1.0, anyres=False),
    "table6_row4": _mixture(2.0, 1.0, anyres=False),
}
