"""Session set-up shared by every test: the CPU is split into two logical devices before TensorFlow starts, so that
the ``tf.distribute`` tests can run a ``MirroredStrategy`` over two replicas on any machine. Computations that name
no device keep running on ``CPU:0``."""
import tensorflow as tf

LOGICAL_CPUS = 2


def _split_cpu() -> None:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS)
    except RuntimeError:  # TensorFlow was initialised before this file was imported
        pass


_split_cpu()
