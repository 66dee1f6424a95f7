"""Multi-turn episodes: observations are context but not trained on, the sampler's log-probs equal a forward
pass over the finished episode, and environment failures, budgets and turn limits end an episode, not a run."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign import sharding
from jaxalign.data.prompts import left_pad, stop_ids
from jaxalign.loops import episodes as E
from jaxalign.loops.ppo import _Rollout
from jaxalign.models import transformer as T
from jaxalign.models.config import preset
from jaxalign.rewards import environments
from jaxalign.steps import grpo as grpo_steps
from jaxalign.steps import policy

pytestmark = pytest.mark.xdist_group("episodes")  # Its module fixture is built once.

CFG = preset("tiny")


class Echo:
  """Answers every turn with ' the movie was' for two turns, then ends with reward 1 (row 'bad': raises)."""

  def reset(self, row):
    self.row, self.n = row, 0
    return "good film" if row.get("intro") else ""

  def step(self, text):
    self.n += 1
    if self.row.get("bad") and self.n == 2:
      raise RuntimeError("environment bug")
    if self.n >= 2:
      return "", 1.0, True
    return " the movie was", 0.5, False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from tests.fixtures import make_tokenizer
  tok = make_tokenizer(str(tmp_path_factory.mktemp("tok")))
  cfg = CFG.replace(vocab_size=len(tok) + (-len(tok) % 16))
  params = T.init_params(cfg, jax.random.key(0))
  mesh = sharding.make_mesh(data=4, fsdp=1, devices=jax.devices()[:4])  # 4 prompts, 8 episodes.
  return tok, cfg, params, mesh


def _episodes(setup, *, max_turns=4, turn_tokens=6, budget=64, group=2, env="tests.loops.test_episodes:Echo",
              policy_logprobs=True):
  tok, cfg, params, mesh = setup
  env_cfg = ml_collections.ConfigDict({"name": env, "max_turns": max_turns, "turn_tokens": turn_tokens,
                                       "observation_role": "tool"})
  ro_cfg = _Rollout(8, budget, 0.8, 0, 1.0)
  eps = E.Episodes(cfg, ro_cfg, env_cfg, tok, mesh, stop_ids=stop_ids(tok), pad_id=tok.pad_token_id,
                   group=group, policy_logprobs=policy_logprobs)
  texts = ["the movie", "a good plot was", "bad actors", "really fun story"]
  ids = [np.asarray(tok.encode(t, add_special_tokens=False)) for t in texts]
  toks, mask = left_pad(ids, 8, tok.pad_token_id)
  rows = [types.SimpleNamespace(text=t, columns={"intro": i % 2 == 0, "bad": i == 3}) for i, t in enumerate(texts)]
  bs = sharding.batch_sharding(mesh)
  put = lambda x: jax.make_array_from_process_local_data(bs, x)  # noqa: E731
  ro, rewards, stats = eps.run(params, {}, put(toks), put(mask), rows, jax.random.key(5))
  return eps, ro, np.asarray(rewards), stats


def test_observations_are_context_not_trained_and_logprobs_equal_the_full_forward(setup):
  tok, cfg, params, _ = setup
  eps, ro, rewards, stats = _episodes(setup)
  tokens, seg, mask = (np.asarray(x) for x in (ro.tokens_BS, ro.segment_ids_BS, ro.mask_BN))
  p = ro.prompt_len
  obs = E.observation_ids(tok, " the movie was", "tool", eps.ends)  # The tokenizer's chat template wraps it.
  assert tok.decode(obs) == "\n<|im_start|>tool\n the movie was<|im_end|>\n<|im_start|>assistant\n"
  for i in range(tokens.shape[0]):
    resp, m, s = tokens[i, p:], mask[i], seg[i, p:]
    assert set(np.flatnonzero(m)) <= set(np.flatnonzero(s))  # Trained tokens are real tokens.
    env_pos = np.flatnonzero((s > 0) & (m == 0))
    # Every episode got the first step's observation last (prompts 0 and 2 also their reset's, first).
    assert list(resp[env_pos][-len(obs):]) == obs, tok.decode(resp[env_pos])
    if (i // 2) % 2 == 0:
      assert tok.decode(resp[env_pos][:-len(obs)]).strip() == "good film"
    assert np.all(s[:int(s.sum())] == 1)  # The episode is contiguous after the prompt, padding after it.
  # The log-probs the sampler recorded turn by turn equal a forward pass over the finished episode, with the
  # group's prompt run once (group=2) and per row (group=1).
  for group in (1, 2):
    full = np.asarray(policy.response_logprobs(cfg, params, ro.tokens_BS, ro.positions_BS, ro.segment_ids_BS, p,
                                               0.8, group=group))
    for i in range(tokens.shape[0]):
      np.testing.assert_allclose(full[i][mask[i] > 0], eps.logprobs[i], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ro.old_logp_BN), full * mask, rtol=1e-4, atol=1e-4)
  # Rewards: 0.5 for the first step, 1 at the end; the raising environment's episodes keep 0.5.
  assert stats.env_failures == 2 and rewards[6] == rewards[7] == 0.5
  assert np.all(rewards[:6] == 1.5)
  assert stats.turns == 2.0 and stats.episode_overruns == 0 and stats.turn_limit == 0


def test_observation_tokens_are_outside_the_loss_and_the_kl(setup):
  tok, cfg, params, _ = setup
  _, ro, rewards, _ = _episodes(setup, group=2)
  g = ml_collections.ConfigDict({"importance": "token", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.5,
                                 "loss_norm": "token", "epochs": 2, "minibatches": 1})
  mb = {"tokens": ro.tokens_BS, "positions": ro.positions_BS, "segment_ids": ro.segment_ids_BS, "mask": ro.mask_BN,
        "old_logp": ro.old_logp_BN + 0.1 * ro.mask_BN, "ref_logp": ro.old_logp_BN - 0.2 * ro.mask_BN,
        "advantages": jnp.asarray(rewards - rewards.mean())}
  kw = dict(cfg=cfg, grpo_cfg=g, temperature=0.8, prompt_len=ro.prompt_len, max_len=ro.mask_BN.shape[1],
            global_tokens=ro.mask_BN.sum(), group=2)
  loss, aux = grpo_steps._loss({"model": params}, mb, **kw)
  env = (ro.segment_ids_BS[:, ro.prompt_len:] > 0) & (ro.mask_BN == 0)
  assert int(env.sum()) > 0
  noisy = dict(mb, old_logp=jnp.where(env, 5.0, mb["old_logp"]), ref_logp=jnp.where(env, -7.0, mb["ref_logp"]))
  loss2, aux2 = grpo_steps._loss({"model": params}, noisy, **kw)
  assert float(loss) == float(loss2) and float(aux["kl"]) == float(aux2["kl"])
  assert float(aux["kl"]) > 0


def test_budget_and_turn_limit_end_episodes(setup, caplog):
  _, ro, _, stats = _episodes(setup, budget=9, turn_tokens=6)  # A turn, then the 26-token observation: over budget.
  assert stats.episode_overruns > 0
  assert "ran past the token budget (train.seq_len - rollout.prompt_len = 9" in caplog.text
  assert int(np.asarray(ro.segment_ids_BS)[:, 8:].sum(-1).max()) <= 9
  _, _, rewards, stats = _episodes(setup, max_turns=1)
  assert stats.turn_limit == 1.0 and stats.turns == 1.0
  assert np.all(rewards == 0.5)  # One step of each (none reached done).


def test_calculator_answers_tool_calls_and_refuses_everything_else():
  env = environments.Calculator()
  assert env.reset({"prompt": "x", "answer": "84"}) == ""
  assert env.step("let me see <calc>12 * (3 + 4)</calc>") == ("<result>84</result>", 0.0, False)
  assert env.step("<calc>7 / 2</calc>")[0] == "<result>3.5</result>"
  assert env.step("<calc>__import__('os').system('ls')</calc>")[0] == "<result>error: ValueError</result>"
  assert env.step("<calc>1 / 0</calc>")[0] == "<result>error: ZeroDivisionError</result>"
  assert env.step("<calc>9 ** 99999</calc>")[0] == "<result>error: ValueError</result>"
  assert env.step("the answer is 84") == ("", 0.0, True)
  assert env.calls == 5


def test_python_tool_runs_code_in_the_sandbox():
  env = environments.PythonTool()
  env.reset({})
  assert env.step("<python>print(sum(range(10)))</python>")[0] == "<result>45</result>"
  obs = env.step("<python>import socket; socket.socket()</python>")[0]
  assert "PermissionError" in obs
