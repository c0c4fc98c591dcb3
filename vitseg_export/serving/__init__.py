"""artifact -> served endpoint: Triton Inference Server model repositories (repository.py), a real Triton
server run in the foreground (server.py), and the client side that judges and times what clients receive
(client.py). The Python-backend model Triton runs is triton_model.py."""
