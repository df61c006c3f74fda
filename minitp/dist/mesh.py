"""Which ranks work together? The (dp, tp) process mesh, its groups, and sizes that must divide.

``world`` ranks are laid out as a (dp, tp) grid, tensor-parallel ranks contiguous:
``rank = dp_rank * tp + tp_rank``. Ranks that share a ``dp_rank`` form one tensor-parallel group (they
hold the shards of one model replica, and talk on every layer, so they are neighbours: on one node when
ranks are placed node by node); ranks that share a ``tp_rank`` form a data-parallel group.

Bad configurations (sizes that do not divide) raise the same ``ValueError`` on every rank before any
communication, because every rank checks the same numbers.

The meshes made so far live here (``_meshes``), and nowhere else; nothing in minitp looks a mesh up.
"""
from mpi4py import MPI

from minitp.dist.runtime import _limit_blas_threads, install_abort_handler

# -- sizes that must divide -------------------------------------------------------------------------


def divide(total, parts, what):
    """``total // parts``, or a ``ValueError`` naming ``what`` when ``parts`` does not divide ``total``.

    Every rank computes this from the same configuration, so every rank raises the same error before
    any collective: no rank is left waiting for a partner that has already stopped.
    """
    if parts <= 0 or total % parts:
        raise ValueError(f"{what}={total} is not divisible by {parts}: choose sizes where it divides")
    return total // parts


# -- groups and the mesh ----------------------------------------------------------------------------


class Group:
    """A set of ranks that communicate: an MPI communicator with a name (``"world"``, ``"tp"``, ``"dp"``).

    ``rank`` is this process's position in the group (0 .. size-1); ``ranks`` lists the members by their
    rank in ``MPI.COMM_WORLD``, in group order.
    """

    def __init__(self, comm, name):
        self.comm = comm
        self.name = name
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        # Translating ranks between MPI groups is local: no communication.
        members, everyone = comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self.ranks = tuple(members.Translate_ranks(list(range(self.size)), everyone))
        members.Free()
        everyone.Free()

    def __repr__(self):
        return f"Group({self.name!r}, rank {self.rank} of {self.size}, world ranks {list(self.ranks)})"


class Mesh:
    """The world's ranks as a (dp, tp) grid: ``world``, ``tp`` and ``dp`` Groups.

    ``tp_size`` ranks with consecutive world ranks share one model replica's shards; ``dp_size`` defaults
    to ``world size // tp_size``. ``dp_size * tp_size`` must equal the world size, else ``ValueError``
    (on every rank: each computes it from the same numbers).
    """

    def __init__(self, tp_size=1, dp_size=None):
        world = MPI.COMM_WORLD
        world_size = world.Get_size()
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, not {tp_size!r}")
        if dp_size is None:
            dp_size = world_size // tp_size
        if not isinstance(dp_size, int) or dp_size < 1 or dp_size * tp_size != world_size:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(
                f"dp_size × tp_size must equal the number of ranks: {dp_size} × {tp_size} ≠ {world_size}. "
                f"Launch a multiple of tp_size ranks (mpirun -n {tp_size}, {2 * tp_size}, ...) "
                f"or choose tp_size among {divisors}")
        self.tp_size, self.dp_size = tp_size, dp_size
        rank = world.Get_rank()
        self.dp_rank, self.tp_rank = divmod(rank, tp_size)  # rank = dp_rank * tp + tp_rank
        self.world = Group(world, "world")
        # Split: ranks passing the same colour form one communicator, ordered by key.
        self.tp = Group(world.Split(color=self.dp_rank, key=self.tp_rank), "tp")
        self.dp = Group(world.Split(color=self.tp_rank, key=self.dp_rank), "dp")

    @property
    def rank(self):
        return self.world.rank

    def __repr__(self):
        return (f"Mesh(world {self.world.size} = dp {self.dp_size} × tp {self.tp_size}; "
                f"rank {self.rank} is tp_rank {self.tp_rank}, dp_rank {self.dp_rank})")


_meshes = {}  # (tp, dp) -> Mesh: init() reuses communicators rather than splitting new ones each call


def init(tp=1, dp=None):
    """The process mesh for ``tp`` × ``dp`` ranks, ready to use: call it first, on every rank, and pass
    its groups (``mesh.tp``, ``mesh.dp``) to every parallel layer and operator -- there is no global
    default, so each call shows which ranks talk.

    Also installs the abort handler (an exception on one rank ends the job) and, when ranks on this
    node share its cores, limits each rank's BLAS to its share of them. Calling it again with the same
    sizes returns the same mesh.
    """
    install_abort_handler()
    key = (tp, dp)
    if key not in _meshes:
        _meshes[key] = Mesh(tp, dp)
        _limit_blas_threads()
    return _meshes[key]
