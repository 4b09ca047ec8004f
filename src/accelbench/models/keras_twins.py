"""The Keras twins of the torch models in mlp.py, cnn.py, bilstm.py and recurrent.py: the same layers and the same
initialisers, here in a file of their own so that a TensorFlow stage loads no torch (a second of its start-up).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..workloads._timeseries import RecurrentModel
    from ..workloads.guava import Model as GuavaModel
    from ..workloads.sentiment import Model as SentimentModel


def mlp(inputs: int, hidden: list[int], dropout: float):
    """models/mlp.py's MLP: Keras' default initialisers, which MLP copies."""
    import keras

    model = keras.Sequential([keras.Input((inputs,))])
    for h in hidden:
        model.add(keras.layers.Dense(h, activation="relu"))
        model.add(keras.layers.Dropout(dropout))
    model.add(keras.layers.Dense(1, dtype="float32"))  # logits stay fp32 under mixed precision
    return model


def guava_cnn(model: GuavaModel, mean: list[float], std: list[float], n_classes: int, image_size: int):
    """models/cnn.py's GuavaCNN; its random layers act only when training=True, i.e. inside fit: on whole
    batches, on the device."""
    import keras

    layers, aug = keras.layers, model.augment
    image = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, dtype="float32")(image)  # uint8 -> float on the device
    if aug.flip:
        x = layers.RandomFlip("horizontal_and_vertical", dtype="float32")(x)
    if aug.rotation_deg:
        x = layers.RandomRotation(aug.rotation_deg / 360, fill_mode="reflect", dtype="float32")(x)
    if aug.crop_min < 1:
        zoom, shift = -(1 - aug.crop_min), (1 - aug.crop_min) / 2
        x = layers.RandomZoom((zoom, 0.0), fill_mode="reflect", dtype="float32")(x)  # negative = zoom in = crop
        x = layers.RandomTranslation(shift, shift, fill_mode="reflect", dtype="float32")(x)
    if aug.jitter:
        x = layers.RandomBrightness(aug.jitter, value_range=(0, 255), dtype="float32")(x)
        x = layers.RandomContrast(aug.jitter, value_range=(0, 255), dtype="float32")(x)
    x = layers.Normalization(mean=mean, variance=np.square(std).tolist(), dtype="float32")(x)
    for i, width in enumerate(model.channels):
        x = layers.Conv2D(width, 3, strides=2 if i == 0 else 1, padding="same", use_bias=False)(x)  # strided stem
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(model.dropout)(x)
    logits = layers.Dense(n_classes, dtype="float32")(x)  # logits stay fp32 under mixed precision
    return keras.Model(image, logits)


def bilstm(model: SentimentModel, vocab_size: int, n_classes: int, max_len: int):
    """models/bilstm.py's BiLSTM. Keras derives the same mask from the padding id (mask_zero); `lengths` is taken to keep the shared
    input signature. Default LSTM settings + right padding keep the layer on the fused cuDNN kernel."""
    import keras

    tokens = keras.Input((max_len,), dtype="int32", name="tokens")
    lengths = keras.Input((), dtype="int64", name="lengths")
    x = keras.layers.Embedding(vocab_size, model.embed_dim, mask_zero=True)(tokens)
    for i in range(model.layers):
        last = i == model.layers - 1
        lstm = keras.layers.LSTM(model.hidden, return_sequences=not last, dropout=model.dropout if i else 0.0)
        x = keras.layers.Bidirectional(lstm)(x)
    x = keras.layers.Dropout(model.dropout)(x)
    logits = keras.layers.Dense(n_classes, dtype="float32")(x)  # fp32 logits under mixed precision
    return keras.Model([tokens, lengths], logits)


def recurrent_layer(cell: str, units: int, return_sequences: bool, **kwargs: Any):
    """Keras' cuDNN path needs exactly these settings (tanh, sigmoid gates, no recurrent dropout, not
    unrolled, bias, GRU reset_after); they are the defaults, spelled out so that none drifts away."""
    import keras

    common = dict(activation="tanh", use_bias=True, recurrent_dropout=0.0, unroll=False,
                  return_sequences=return_sequences, **kwargs)  # fmt: skip
    if cell == "lstm":
        return keras.layers.LSTM(units, recurrent_activation="sigmoid", **common)
    if cell == "gru":
        return keras.layers.GRU(units, recurrent_activation="sigmoid", reset_after=True, **common)
    return keras.layers.SimpleRNN(units, **common)  # Keras has no cuDNN kernel for it


def recurrent(model: RecurrentModel, window: int, section: str):
    """models/recurrent.py's RecurrentRegressor."""
    import keras

    inputs = keras.Input((window, 1))
    h = inputs
    steps = model.steps(window, section)
    if steps < window:
        h = keras.layers.Cropping1D((window - steps, 0))(h)
    for i in range(model.layers):
        h = recurrent_layer(model.cell, model.units, return_sequences=i < model.layers - 1)(h)
        h = keras.layers.Dropout(model.dropout)(h)
    out = keras.layers.Dense(1, dtype="float32")(h)  # fp32 output under mixed precision
    return keras.Model(inputs, out)


def recurrent_uses_cudnn(model: RecurrentModel) -> tuple[bool, str]:
    """Whether Keras traces the configured cell to its fused cuDNN kernel: asked of a probe layer's graph."""
    import tensorflow as tf

    layer = recurrent_layer(model.cell, model.units, False, kernel_initializer="zeros", recurrent_initializer="zeros")
    layer.build((2, 4, 1))  # weights made eagerly: a tf.function may not create them under a MirroredStrategy
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(tf.TensorSpec((2, 4, 1))).graph
    if any(op.type.startswith("CudnnRNN") for op in graph.get_operations()):
        return True, "fused cuDNN kernel (CudnnRNNV3) in the traced graph of a probe layer"
    why = "Keras SimpleRNN has no cuDNN kernel" if model.cell == "rnn" else "Keras fell back to its generic loop"
    return False, f"{why}: no CudnnRNN op in the traced graph of a probe layer"
