"""The prefix cache (edge/prefix.py) through the engine's worker: the same output with and without it on every family
(fast graph) and on optimum's graph, the same samples for a seed, identical text on the real models, LRU within the
budget, the cache file across restarts, and the memory check counting its budget."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import with_other_weights
from families import FAMILIES

import edge
from edge import memory
from edge.bundle import open_bundle
from edge.cache import KVState
from edge.engine import DEMO, resolve
from edge.prefix import PrefixCache, PrefixCacheFileError

GRAPHS = [(f.name, "auto") for f in FAMILIES] + [("qwen3", "optimum")]
SHARED = 140  # tokens two prompts share: more than one prefill chunk (64; 128 on the fast graph)


def ints(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, size=n).tolist()


def greedy(engine, ids, **kw):
    return list(engine.stream(ids, temperature=0, max_tokens=12, top_logprobs=2, **kw))


def assert_same_greedy(cold, warm):
    """Tokens identical where the top-2 margin exceeds 1e-3, log-probabilities within 1e-4; past a near tie the
    two may go different ways."""
    for c, w in zip(cold, warm):
        margin = c.top_logprobs[0][1] - c.top_logprobs[1][1]
        if c.token != w.token:
            assert margin <= 1e-3, f"the cache changed a greedy token with a margin of {margin}"
            return
        assert [t for t, _ in c.top_logprobs] == [t for t, _ in w.top_logprobs] or margin <= 1e-3
        np.testing.assert_allclose([lp for _, lp in w.top_logprobs], [lp for _, lp in c.top_logprobs], atol=1e-4)
    assert [r.finish_reason for r in cold] == [r.finish_reason for r in warm]


@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_the_prefix_cache_changes_nothing(exports, name, graph):
    engine = edge.load(exports.bundle(name, graph=graph), context_length=128, prefix_cache_mb=4)
    shared = min(SHARED, engine.context_length - 30)  # phi3-longrope's context is 64
    prefix = ints(shared, 0)
    a, b = prefix + ints(5, 1), prefix + ints(7, 2)
    cold = greedy(engine, b, cache_prompt=False)
    assert cold[0].cached_tokens == 0
    greedy(engine, a)
    warm = greedy(engine, b)  # from the live state, which holds a's tokens
    assert warm[0].cached_tokens == shared
    assert_same_greedy(cold, warm)
    greedy(engine, ints(30, 3))  # the live state moves to another prompt: b comes back from its snapshot
    again = greedy(engine, b)
    assert again[0].cached_tokens == len(b) - 1
    assert_same_greedy(cold, again)
    assert greedy(engine, b, cache_prompt=False)[0].cached_tokens == 0  # the per-request opt-out


def test_sampling_with_a_seed_draws_the_same_tokens(exports):
    engine = edge.load(exports.bundle("qwen3"), context_length=256, prefix_cache_mb=4)
    prefix = ints(SHARED, 0)
    args = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=11, max_tokens=24)
    cold = [r.token for r in engine.stream(prefix + ints(4, 5), cache_prompt=False, **args)]
    list(engine.stream(prefix + ints(6, 6), **args))
    warm = list(engine.stream(prefix + ints(4, 5), **args))
    assert warm[0].cached_tokens >= SHARED and [r.token for r in warm] == cold


SYSTEM = ("You are the assistant of a bakery in a small town. The bakery opens at seven in the morning and closes at "
          "six in the evening, every day but Monday. It sells bread, croissants, apple pie and a cheese cake that "
          "people drive an hour for. Answer questions from customers in one or two short sentences, kindly, and never "
          "make up prices: say that the prices are on the board by the door.")


@pytest.mark.parametrize("name", ["stories260K", "smollm2-135m"])
def test_real_models_write_the_same_text_with_the_cache(exports, name):
    engine = edge.load(exports.bundle(name, "int4"), prefix_cache_mb=32)
    if name == "stories260K":
        story = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog."
        prompts = [dict(prompt=story + " One day, Lily"), dict(prompt=story + " Her dog was")]
    else:
        prompts = [dict(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
                   for question in ("When do you open on Sunday?", "Do you sell cheese cake?")]
    args = dict(temperature=0, max_tokens=40)
    cold = [engine.generate(**p, cache_prompt=False, **args) for p in prompts]
    warm = [list(engine.stream(**p, **args)) for p in prompts]
    assert warm[1][0].cached_tokens >= (20 if name == "stories260K" else 80)
    assert ["".join(r.text for r in records) for records in warm] == cold


def test_entries_are_kept_within_the_budget_least_recently_used_first():
    def state(tokens):
        s = KVState(num_layers=2, num_kv_heads=1, head_dim=4)
        s.append(tokens, [np.ones((1, 1, len(tokens), 4), np.float32)] * 2, [np.ones((1, 1, len(tokens), 4), np.float32)] * 2)
        return s
    per_token = 2 * 2 * 4 * 4  # layers x (key, value) x head_dim x 4 bytes
    cache = PrefixCache(budget_bytes=100 * per_token)
    cache.remember(state(list(range(10))))  # too short to keep
    assert not cache.entries
    cache.remember(state(list(range(40))))
    cache.remember(state(list(range(40)) + [7] * 10))  # extends the first: replaces it
    assert [len(t) for t in cache.entries] == [50]
    cache.remember(state([5] * 40))
    cache.best([5] * 40 + [1])  # used: now the most recent
    cache.remember(state([6] * 40))  # over the budget: the least recently used goes
    assert sorted(t[0] for t in cache.entries) == [5, 6] and cache.nbytes <= cache.budget
    assert cache.best([5] * 45) == (40, cache.entries[tuple([5] * 40)])


def test_the_cache_file_warms_a_new_engine_and_is_refused_for_another_bundle(exports, tmp_path):
    bundle = exports.bundle("qwen3")
    first = edge.load(bundle, prefix_cache_mb=8)
    prompt = ints(SHARED, 0) + ints(5, 1)
    want = [r.token for r in first.stream(prompt, temperature=0, max_tokens=8)]
    path = tmp_path / "prefix.npz"
    assert first.save_prefix_cache(path) == 1
    second = edge.load(bundle, prefix_cache_mb=8)
    assert second.load_prefix_cache(path) == 1
    records = list(second.stream(prompt, temperature=0, max_tokens=8))
    assert records[0].cached_tokens == len(prompt) - 1 and [r.token for r in records] == want
    other = edge.load(exports.bundle("qwen2.5"), prefix_cache_mb=8)
    with pytest.raises(PrefixCacheFileError, match="another bundle"):
        other.load_prefix_cache(path)
    (tmp_path / "junk.npz").write_bytes(b"not a cache file")
    with pytest.raises(PrefixCacheFileError, match="not a readable"):
        second.load_prefix_cache(tmp_path / "junk.npz")
    assert not other.prefix_cache.entries and other.generate("Hello", max_tokens=2) is not None


def test_a_cache_file_is_refused_for_the_same_graph_with_other_weights(tmp_path):
    first = edge.load(with_other_weights(resolve("demo"), tmp_path / "first", seed=1), prefix_cache_mb=8)
    second = edge.load(with_other_weights(resolve("demo"), tmp_path / "second", seed=2), prefix_cache_mb=8)
    first.generate(ints(SHARED, 0), max_tokens=1)
    assert first.save_prefix_cache(tmp_path / "prefix.npz") == 1
    with pytest.raises(PrefixCacheFileError, match="another bundle"):
        second.load_prefix_cache(tmp_path / "prefix.npz")


def budget_profile(tmp_path, budget_mb: int, prefix_mb: int):
    from edge.devices import load_profile

    path = tmp_path / "budget.toml"
    path.write_text(f'name = "budget"\n[[providers]]\nname = "CPUExecutionProvider"\n'
                    f'[memory]\nbudget_mb = {budget_mb}\ndefault_context = 512\nprefix_cache_mb = {prefix_mb}\n')
    return load_profile(path)


def test_the_memory_check_counts_the_budget(tmp_path, capfd):
    need = memory.estimate(open_bundle(DEMO), 512)
    assert memory.estimate(open_bundle(DEMO), 512, prefix_mb=50).total_mb == need.total_mb + 50
    tight = budget_profile(tmp_path, int(need.total_mb) + 10, prefix_mb=50)
    engine = edge.load("demo", profile=tight)  # the profile's cache does not fit: off, with a note
    assert engine.prefix_cache is None and "no room for the profile's 50 MB prefix cache" in capfd.readouterr().err
    with pytest.raises(memory.MemoryBudgetError, match="prefix cache 50"):  # asked for: refused with the numbers
        edge.load("demo", profile=tight, prefix_cache_mb=50)
    assert edge.load("demo", profile=budget_profile(tmp_path, 1000, 50)).prefix_cache.budget == 50 << 20
