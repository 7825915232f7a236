"""torus metadata backend on Redis"""
