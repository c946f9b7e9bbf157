"""`serve --replicas N`: jobs run on Ray Serve replicas of the model (deployment.py), started or found by
cluster.py and fed by the server's queue through dispatch.py. Imported only when replicas are asked for: a
server of one replica never imports Ray."""
