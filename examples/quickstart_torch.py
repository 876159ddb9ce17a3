"""A PyTorch train step with the label-smoothed module (the README's PyTorch example)."""

import torch

import lstorch

model = torch.nn.Linear(64, 10)
loss_fn = lstorch.SmoothedCrossEntropyLoss(smoothing=0.1, convention="uniform")
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

if __name__ == "__main__":
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(128, 64, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    for step in range(5):
        optimizer.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
