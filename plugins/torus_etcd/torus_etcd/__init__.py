"""torus metadata backend on etcd v3"""
