"""Models built in threads come out tied while another thread runs ``from_pretrained``.

transformers' ``from_pretrained`` replaces ``PreTrainedModel.tie_weights`` with a no-op for the
whole process while it loads (``transformers.initialization.no_tie_weights``); a skeleton built
in another thread at that moment would have an untied ``lm_head`` (the Minitron job's candidate
tasks failed on it, now and then). Every build holds ``MODEL_BUILD_LOCK``.
"""

import threading

from tiny_models import make_tiny
from transformers.initialization import no_tie_weights

from pruning_core.arch import MODEL_BUILD_LOCK, meta_model


def test_a_meta_skeleton_waits_for_a_load_in_progress_and_is_tied():
    config = make_tiny("llama").config
    assert config.tie_word_embeddings
    built: list = []
    loading, release = threading.Event(), threading.Event()

    def load_in_progress():
        with MODEL_BUILD_LOCK, no_tie_weights():  # what from_pretrained does while it reads weights
            loading.set()
            release.wait(10)

    loader = threading.Thread(target=load_in_progress)
    loader.start()
    loading.wait(10)
    builder = threading.Thread(target=lambda: built.append(meta_model(config)))
    builder.start()
    builder.join(0.5)
    assert builder.is_alive()  # waits for the load
    release.set()
    loader.join()
    builder.join(10)
    model = built[0]
    assert model.lm_head.weight is model.get_input_embeddings().weight
