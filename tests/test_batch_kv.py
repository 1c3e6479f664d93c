"""Batch states in in-place buffers (gathering, taking rows, rewinding, forwards writing in place) and
the KV cache helpers of seecl.model.kv they rest on."""

import torch

from seecl.model.kv import cache_keyword, kv_over, returned_cache
from seecl.serving.batch_kv import Rows, allocate, gather


def _state(rows: int, length: int, room: int, seed: int) -> Rows:
    """A state whose KV is random, its mask all ones but a left pad of one column on row 0."""
    generator = torch.Generator().manual_seed(seed)
    state = allocate(torch.zeros(()), (2, 3, 4), rows, length + room)
    for k, v in state.buffers():
        k[:, :, :length] = torch.randn(rows, 3, length, 4, generator=generator)
        v[:, :, :length] = torch.randn(rows, 3, length, 4, generator=generator)
    mask = torch.ones((rows, length), dtype=torch.long)
    mask[0, 0] = 0
    return Rows(kv_over(state.buffers(), length), mask, torch.arange(rows) + length)


def test_gather_left_pads_with_zeros_and_keeps_the_chosen_rows_in_order():
    short, long = _state(3, 5, 2, seed=0), _state(2, 8, 0, seed=1)
    merged = gather([(short, [2, 0]), (long, [1])], room=6)
    assert merged.length == 8 and merged.room == 6 and merged.mask.shape == (3, 8)
    for (k, _), (sk, _), (lk, _) in zip(merged.buffers(), short.buffers(), long.buffers()):
        assert torch.equal(k[0, :, :3], torch.zeros(3, 3, 4)), "pad columns are zeros, not leftover memory"
        assert torch.equal(k[0, :, 3:8], sk[2, :, :5])
        assert torch.equal(k[1, :, 3:8], sk[0, :, :5])
        assert torch.equal(k[2, :, :8], lk[1, :, :8])
    assert merged.mask[:2, :3].sum() == 0 and merged.mask[1, 3] == 0  # row 0 of `short` kept its own pad
    assert merged.mask[2].tolist() == long.mask[1].tolist()
    assert merged.next_pos.tolist() == [short.next_pos[2], short.next_pos[0], long.next_pos[1]]


def test_take_hands_over_all_rows_without_a_copy_and_copies_a_subset():
    state = _state(3, 5, 4, seed=2)
    assert state.take([0, 1, 2]) is state
    same_buffers = state.take([0, 1, 2]).buffers()[0][0]
    assert same_buffers.data_ptr() == state.buffers()[0][0].data_ptr()
    subset = state.take([2])
    assert subset.buffers()[0][0].data_ptr() != state.buffers()[0][0].data_ptr()
    assert torch.equal(subset.cache.layers[0].keys[0], state.cache.layers[0].keys[2])
    assert subset.room == state.room
    assert state.take([0, 1, 2], room=10).room == 10, "too little room: a copy with enough of it"


def test_a_forward_writes_into_the_buffers_and_rewinding_lets_the_next_one_overwrite(tiny_base):
    model = tiny_base.model
    from seecl.model.kv import kv_shape

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=True)
        state = allocate(model.get_input_embeddings().weight, kv_shape(model), 2, 8)
        pointer = state.buffers()[0][0].data_ptr()
        out = model(input_ids=ids[:, :3], use_cache=True, **{cache_keyword(): state.cache})
        body = Rows(returned_cache(out), torch.ones((2, 3), dtype=torch.long), torch.full((2,), 3))
        assert body.buffers()[0][0].data_ptr() == pointer, "no reallocation within the capacity"
        tails = []
        for token in (8, 12):  # two "checks" on the same body, the second overwriting the first
            body.rewind()
            step = model(
                input_ids=torch.full((2, 1), token),
                use_cache=True,
                position_ids=torch.full((2, 1), 3),
                **{cache_keyword(): body.cache},
            )
            tails.append(step.logits[:, -1])
    assert torch.allclose(tails[0][0], full.logits[0, -1], atol=1e-5)  # row 0 continued with its own token
    assert torch.allclose(tails[1][1], full.logits[1, -1], atol=1e-5), "the rewound body, not the first tail"
    assert body.cache.get_seq_length() == 4


def test_kv_cache_goes_in_under_the_name_the_installed_model_takes_without_deprecation(tiny_base, recwarn):
    import inspect

    from seecl.model.kv import cache_keyword, returned_cache

    model = tiny_base.model
    assert cache_keyword() in inspect.signature(type(model).forward).parameters
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        first = model(input_ids=ids, use_cache=True)
        again = model(input_ids=ids[:, -1:], use_cache=True, **{cache_keyword(): returned_cache(first)})
    assert returned_cache(again).get_seq_length() == 4
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_kv_cache_shares_its_tensors_and_a_forward_leaves_them_unchanged(tiny_base):
    from transformers import DynamicCache

    from seecl.model.kv import cache_keyword, kv_cache, returned_cache

    model = tiny_base.model
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.inference_mode():
        layers = [(layer.keys, layer.values) for layer in returned_cache(model(input_ids=ids, use_cache=True)).layers]
        before = [(k.clone(), v.clone()) for k, v in layers]
        shared = kv_cache(layers)
        assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(shared.layers, layers))
        step = torch.tensor([[9], [10]])
        out = model(input_ids=step, use_cache=True, **{cache_keyword(): shared})
        copied = model(input_ids=step, use_cache=True, **{cache_keyword(): DynamicCache(ddp_cache_data=before)})
    assert torch.equal(out.logits, copied.logits)
    assert shared.get_seq_length() == 5
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(layers, before))


def test_kv_buffer_decodes_like_a_growing_cache_and_leaves_its_source_unchanged(tiny_base):
    from transformers import DynamicCache

    from oracles import kv_buffer
    from seecl.model.kv import cache_keyword, returned_cache

    model = tiny_base.model
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        layers = [(layer.keys, layer.values) for layer in returned_cache(model(input_ids=ids, use_cache=True)).layers]
        before = [(k.clone(), v.clone()) for k, v in layers]
        buffered = kv_buffer(layers, capacity=6)  # room for 2 more positions, then it must grow
        growing = DynamicCache(ddp_cache_data=before)
        for step, token in enumerate([13, 14, 15, 16, 17]):
            if step == 2:  # drop the middle row from both
                index = torch.tensor([0, 2])
                buffered.batch_select_indices(index)
                growing.batch_select_indices(index)
            rows = buffered.layers[0].keys.shape[0]
            feed = torch.full((rows, 1), token)
            out = model(input_ids=feed, use_cache=True, **{cache_keyword(): buffered})
            ref = model(input_ids=feed, use_cache=True, **{cache_keyword(): growing})
            buffered, growing = returned_cache(out), returned_cache(ref)
            assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert buffered.get_seq_length() == 9
    for mine, theirs in zip(buffered.layers, growing.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(layers, before))
