"""StepCallbackList: no conversion of the step logs (a host sync) unless a callback reads them."""

import keras
import numpy as np
import pytest

from tf_explog.callbacks import NonFiniteGuard, StepCallbackList
from tf_explog.errors import NonFiniteError


class Recorder(keras.callbacks.Callback):
    """Records the types of the step logs it is given."""

    def __init__(self, tensor_logs=False):
        super().__init__()
        self.tensor_logs = tensor_logs
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((batch, type(logs["loss"]), logs["loss"]))


class EpochOnly(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


def _fit(callbacks, x, y, epochs=2):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    listed = StepCallbackList(callbacks, add_history=True, model=model, verbose=0,
                              epochs=epochs, steps=None)
    history = model.fit(x, y, batch_size=4, epochs=epochs, callbacks=listed, verbose=0,
                        shuffle=False)
    return model, history


def test_logs_reach_each_callback_as_it_asks():
    x = np.random.default_rng(0).normal(size=(12, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    floats, tensors, epochs = Recorder(), Recorder(tensor_logs=True), EpochOnly()
    model, history = _fit([floats, tensors, epochs], x, y)
    assert [b for b, _, _ in floats.seen] == [0, 1, 2, 0, 1, 2]
    assert all(t is float for _, t, _ in floats.seen)
    # The tensor-reading callback got the backend's tensors, not converted numbers...
    assert all(keras.ops.is_tensor(v) and t is not float for _, t, v in tensors.seen)
    # ...holding the same values.
    np.testing.assert_allclose([float(keras.ops.convert_to_numpy(v)) for _, _, v in tensors.seen],
                               [v for _, _, v in floats.seen], rtol=1e-6)
    assert epochs.epochs == 2
    # History still recorded: fit returns it and the model keeps it.
    assert len(history.history["loss"]) == 2 and model.history is history


def test_non_finite_guard_reads_tensor_losses_and_names_the_step():
    x = np.random.default_rng(1).normal(size=(12, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    y[5] = np.inf  # step 2 of epoch 1 (batches of 4)
    with pytest.raises(NonFiniteError, match="epoch 1, step 2"):
        _fit([NonFiniteGuard()], x, y)
