# The README's example ("The loss as a PyTorch op"), run by scripts/test-python.
import torch
import invaspread.torch as ist

encoder = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128))
opt = torch.optim.SGD(encoder.parameters(), lr=0.03, momentum=0.9)
images = torch.randn(256, 32)
for step in range(10):
    batch = images[torch.randint(0, 256, (64,))]
    z = encoder(torch.cat([batch + 0.1 * torch.randn_like(batch), batch + 0.1 * torch.randn_like(batch)]))
    loss = ist.instance_loss(z, tau=0.1)  # rows i and i + 64: two views of image i
    opt.zero_grad(); loss.backward(); opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
