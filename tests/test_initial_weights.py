"""A fresh run's parts from pretrained weights (`unimm_jax.train.initial_weights`): EvoTok's
encoder from a SigLIP directory, the LM's LLM from a Qwen2 one, UniToken's LLM and ViT,
each written by transformers in the test and compared with transformers' own outputs."""
import flax
import jax
import numpy as np
import pytest

from conftest import EVOTOK_TINY, FAST_COMPILE
from unimm_jax import config_defaults
from unimm_jax.models import evotok as evotok_model
from unimm_jax.models.vit import VisionTransformer
from unimm_jax.train import trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _siglip(path, **overrides) -> "transformers.SiglipVisionModel":
  """A random SigLIP vision tower of tiny EvoTok's encoder shape (3 layers, 32 wide, 32 px,
  patch 8), its norms and biases drawn away from 1 and 0, saved at `path`."""
  fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, image_size=32, patch_size=8, layer_norm_eps=1e-6)
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**fields,
                                                                            **overrides}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
        p.add_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(path)
  return model


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def evotok_started(tmp_path_factory):
  """(hf model, config, fresh state, state started from the SigLIP directory)."""
  path = tmp_path_factory.mktemp("siglip_encoder")
  hf = _siglip(path)
  config = config_defaults.load_config(EVOTOK_TINY)
  config.model.encoder.init_path = str(path)
  config.ema_decay = 0.99  # the EMA params start from the weights too
  setup = trainer.Setup(config)
  fresh = setup.init_state(FAST_COMPILE)
  return hf, config, fresh, setup.start_from_weights(fresh)


def test_evotok_encoder_starts_from_siglip(evotok_started):
  """The encoder's features (hidden_states[-2]) are transformers' on the same images."""
  hf, config, _, state = evotok_started
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  encoder = VisionTransformer(evotok_model.encoder_config(config.model))
  for params in (state.params, state.ema_params):
    with jax.default_matmul_precision("highest"):
      got = encoder.apply({"params": params["encoder"]}, images)["last_hidden_state"]
    with torch.no_grad():
      want = hf(torch.tensor(images.transpose(0, 3, 1, 2)),
                output_hidden_states=True).hidden_states[-2].numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_only_the_encoder_changes_and_the_state_keeps_its_layout(evotok_started):
  """Everything but the encoder is the fresh init; the tree, shapes, dtypes and shardings
  are the fresh state's, so the compiled train step takes it."""
  _, _, fresh, state = evotok_started
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  before, after = _flat(fresh.params), _flat(state.params)
  changed = {name for name in before if not np.array_equal(before[name], after[name])}
  assert changed and all(name.startswith("encoder/") for name in changed)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(state)):
    assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_hidden_layers=4), "has 4 layers, config.model.encoder.num_layers=3"),
    (dict(layer_norm_eps=1e-5), "layer_norm_eps=1e-05"),
    (dict(intermediate_size=48), "mlp_dim=48"),
])
def test_a_checkpoint_that_does_not_fit_is_named(tmp_path, overrides, message):
  _siglip(tmp_path, **overrides)
  config = config_defaults.load_config(EVOTOK_TINY)
  config.model.encoder.init_path = str(tmp_path)
  task = trainer.Setup(config).task
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
    task.initial_weights()


def test_overlay_names_the_tensor_whose_shape_differs(evotok_started):
  from unimm_jax.convert.hf_checkpoint import LazyArray
  from unimm_jax.train import initial_weights
  _, config, fresh, _ = evotok_started
  setup = trainer.Setup(config)
  wrong = {"encoder": {"patch_embedding": LazyArray(
      shape=(1, 2), source="vision_model.embeddings.patch_embedding.weight",
      view=lambda: np.zeros((1, 2)))}}
  with pytest.raises(ValueError, match="patch_embedding.weight has shape \\(1, 2\\)"):
    initial_weights.overlay(fresh.params, setup.state_shardings.params, wrong)
  missing = {"encoder": {"no_such_layer": {"kernel": np.zeros((1, 2))}}}
  with pytest.raises(ValueError, match="encoder/no_such_layer/kernel, which the model"):
    initial_weights.overlay(fresh.params, setup.state_shardings.params, missing)


def test_lm_starts_from_a_qwen2_checkpoint(tmp_path):
  """Tiny LM config made Qwen2's architecture (q/k/v biases): logits are transformers'."""
  torch.manual_seed(0)
  hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.5,
      tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0)))
  hf.eval().save_pretrained(tmp_path)
  config = config_defaults.load_config("configs/lm.py:tiny")
  config.model.update(vocab_size=512, qkv_bias=True, init_path=str(tmp_path))
  setup = trainer.Setup(config)
  state = setup.start_from_weights(setup.init_state(FAST_COMPILE))
  ids = np.random.default_rng(0).integers(0, 512, size=(2, 9))
  with jax.default_matmul_precision("highest"):
    got = np.asarray(setup.task.model.apply({"params": state.params}, ids))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  config.model.rope_theta = 500.0
  with pytest.raises(ValueError, match="rope_theta=10000.0, the model \\(config\\) 500.0"):
    trainer.Setup(config).task.initial_weights()


def test_unitoken_starts_its_llm_from_chameleon_and_its_vit_from_siglip(tmp_path):
  """Tiny UniToken: the LLM's logits are transformers' Chameleon's, the ViT's output
  (after its post-LayerNorm) transformers' SigLIP's; the adapter stays as initialised."""
  config = config_defaults.load_config("configs/unitoken.py:tiny")
  vocab = config.model.vocab_size
  torch.manual_seed(0)
  chameleon = transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.5,
      vocabulary_map={"<image>": vocab - 1}, vq_config=dict(
          embed_dim=8, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
          channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])))
  chameleon.eval().save_pretrained(tmp_path / "chameleon")
  siglip = _siglip(tmp_path / "siglip", num_hidden_layers=1, image_size=16)
  config.model.init_path = str(tmp_path / "chameleon")
  config.vit.init_path = str(tmp_path / "siglip")
  setup = trainer.Setup(config)
  fresh = setup.init_state(FAST_COMPILE)
  state = setup.start_from_weights(fresh)
  system = setup.task.system
  ids = np.random.default_rng(0).integers(0, vocab - 1, size=(2, 9))
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(system.llm.apply({"params": state.params["llm"]}, ids))
    features = system.vision.apply({"params": state.params["vit"]}, images)
  with torch.no_grad():
    want_logits = chameleon(torch.tensor(ids)).logits.numpy()
    want_features = siglip(torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
  np.testing.assert_allclose(logits[..., :vocab - 1], want_logits[..., :vocab - 1],
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(features["last_hidden_state"]), want_features.numpy(),
                             atol=2e-5, rtol=2e-5)
  before, after = _flat(fresh.params["adapter"]), _flat(state.params["adapter"])
  assert all(np.array_equal(before[name], after[name]) for name in before)


def test_evotok_mllm_starts_its_image_markers_at_the_mean_row(tmp_path):
  """The LLM from a Qwen2 directory; [BOI] and [EOI] (new tokens for the authors) get the
  mean of the embedding rows below them, in the input embedding and in the LM head."""
  config = config_defaults.load_config("configs/evotok_mllm.py:tiny")
  vocab, (boi, eoi) = config.model.vocab_size, (config.tokens.boi, config.tokens.eoi)
  torch.manual_seed(0)
  hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
      tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e4)))
  hf.save_pretrained(tmp_path)
  config.model.init_path = str(tmp_path)
  setup = trainer.Setup(config)
  state = setup.start_from_weights(setup.init_state(FAST_COMPILE))
  embedding = np.asarray(state.params["llm"]["embed_tokens"]["embedding"])
  head = np.asarray(state.params["llm"]["lm_head"])  # (hidden, vocab)
  want_in = hf.model.embed_tokens.weight.detach().numpy()
  want_out = hf.lm_head.weight.detach().numpy()
  first = min(boi, eoi)
  for got, want in ((embedding, want_in), (head.T, want_out)):
    np.testing.assert_array_equal(got[:first], want[:first])
    for marker in (boi, eoi):
      np.testing.assert_allclose(got[marker], want[:first].mean(0), rtol=1e-5, atol=1e-6)
