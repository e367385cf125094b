"""Tests against a real Kubernetes API server (kube-apiserver + etcd) on 127.0.0.1."""
