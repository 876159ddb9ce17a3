"""A jitted optax train step with a label-smoothed loss (the README's JAX example)."""

import jax
import jax.numpy as jnp
import optax

import lsjax

params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
optimizer = optax.adam(1e-2)
opt_state = optimizer.init(params)


@jax.jit
def train_step(params, opt_state, images, labels):
    def loss_fn(params):
        logits = images @ params["w"] + params["b"]
        return lsjax.smoothed_cross_entropy(logits, labels, smoothing=0.1, reduction="mean")

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss


if __name__ == "__main__":
    key_x, key_y = jax.random.split(jax.random.key(0))
    images = jax.random.normal(key_x, (128, 64))
    labels = jax.random.randint(key_y, (128,), 0, 10)
    for step in range(5):
        params, opt_state, loss = train_step(params, opt_state, images, labels)
        print(f"step {step}: loss {float(loss):.4f}")
