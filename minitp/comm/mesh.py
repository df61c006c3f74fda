"""Which ranks work together? The (dp, pp, cp, tp) process mesh, its groups, and sizes that must divide.

``world`` ranks are laid out as a (dp, pp, cp, tp) grid, tensor-parallel ranks contiguous:
``rank = ((dp_rank·pp + pp_rank)·cp + cp_rank)·tp + tp_rank``. Ranks that differ only in their tp
coordinate form one tensor-parallel group (they hold the shards of one layer and talk on every layer, so
they are neighbours: on one node when ranks are placed node by node); likewise for cp (blocks of one
sequence), pp (the stages of one replica) and dp (the replicas).

Bad configurations (sizes that do not divide) raise the same ``ValueError`` on every rank before any
communication, because every rank checks the same numbers.

The meshes made so far live here (``_meshes``), and nowhere else; nothing in minitp looks a mesh up.
"""
from mpi4py import MPI

from minitp.comm.checks import set_checked
from minitp.comm.failures import install_abort_handler
from minitp.comm.runtime import _limit_blas_threads

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


AXES = ("dp", "pp", "cp", "tp")
"""The mesh's axes, outermost first: ``rank = ((dp_rank·pp + pp_rank)·cp + cp_rank)·tp + tp_rank``."""


class Mesh:
    """The world's ranks as a (dp, pp, cp, tp) grid, tensor-parallel ranks innermost (as picotron's
    ``arange(world).view(dp, pp, cp, tp)`` and Megatron's default order).

    - ``tp``: the ranks holding the shards of one layer -- they talk on every layer, so they are
      neighbours (consecutive world ranks: on one node when ranks are placed node by node);
    - ``cp``: the ranks holding blocks of one sequence (context parallelism);
    - ``pp``: the pipeline stages of one model replica, in stage order (``pp.rank`` is the stage);
    - ``dp``: the data-parallel replicas.

    Each axis is a ``Group`` of the ranks that differ only in that coordinate; ``dp_cp`` joins dp and cp
    (the parameters are replicated over both, so their gradients are reduced over both). Sizes default to
    1 and ``dp_size`` to whatever is left of the world; the product must be the world size, else
    ``ValueError`` (on every rank: each computes it from the same numbers).

    **Expert parallelism** (``ep_size``) adds no ranks: as in Megatron-core it is carved out of the
    data-parallel replicas, and ep must divide dp (``ValueError`` otherwise). The dp coordinate splits into
    (expert-dp, ep), ep innermost: ``dp_rank = edp_rank·ep + ep_rank``. So

    - ``ep``: ep consecutive dp replicas; together they hold all E experts, E/ep each, and their tokens
      travel between them (the dispatch and combine all-to-alls);
    - ``expert_dp``: the dp/ep replicas holding the same experts, whose expert gradients are reduced
      together -- every other parameter is reduced over all of dp.

    With ep = 1 (every mesh before experts) ``ep`` is this rank alone and ``expert_dp`` is ``dp`` itself: no
    communicator is added.
    """

    def __init__(self, tp_size=1, dp_size=None, pp_size=1, cp_size=1, ep_size=1):
        world = MPI.COMM_WORLD
        world_size = world.Get_size()
        for name, size in (("tp_size", tp_size), ("pp_size", pp_size), ("cp_size", cp_size), ("ep_size", ep_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, not {size!r}")
        inner = tp_size * cp_size * pp_size
        if dp_size is None:
            dp_size = world_size // inner
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1 \
                or dp_size * inner != world_size:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(
                f"dp × pp × cp × tp must equal the number of ranks: {dp_size} × {pp_size} × {cp_size} × "
                f"{tp_size} ≠ {world_size}. Launch a multiple of pp × cp × tp = {inner} ranks "
                f"(mpirun -n {inner}, {2 * inner}, ...) or choose sizes among the divisors {divisors}")
        if dp_size % ep_size:
            raise ValueError(f"ep ({ep_size}) must divide dp ({dp_size}): expert parallelism is carved out of the "
                             f"data-parallel replicas (ep consecutive replicas share the E experts, E/ep each); "
                             f"choose ep among the divisors of dp, {[d for d in range(1, dp_size + 1) if dp_size % d == 0]}")
        self.sizes = dict(dp=dp_size, pp=pp_size, cp=cp_size, tp=tp_size)
        self.ep_size = ep_size
        self.tp_size, self.dp_size, self.pp_size, self.cp_size = tp_size, dp_size, pp_size, cp_size
        rank = world.Get_rank()
        self.coordinates = self._coordinates(rank)
        self.dp_rank, self.pp_rank, self.cp_rank, self.tp_rank = (self.coordinates[a] for a in AXES)
        self.world = Group(world, "world")
        # Split: ranks passing the same colour form one communicator, ordered by key. A group along some
        # axes holds the ranks whose other coordinates equal ours: colour = the rank with those zeroed.
        self.tp = self._group(world, ("tp",))
        self.cp = self._group(world, ("cp",))
        self.pp = self._group(world, ("pp",))
        self.dp = self._group(world, ("dp",))
        self.dp_cp = self._group(world, ("dp", "cp"), name="dp_cp")
        self.ep_rank, self.edp_rank = self.dp_rank % ep_size, self.dp_rank // ep_size
        if ep_size == 1:
            self.ep, self.expert_dp = Group(MPI.COMM_SELF, "ep"), self.dp
        else:
            first = self.dp_rank - self.ep_rank  # the ep group: dp ranks first .. first + ep - 1
            self.ep = Group(world.Split(color=self.rank_of(dp=first), key=self.ep_rank), "ep")
            self.expert_dp = Group(world.Split(color=self.rank_of(dp=self.ep_rank), key=self.edp_rank), "expert_dp")

    def _coordinates(self, rank):
        """{axis: coordinate} of world rank ``rank``."""
        coordinates = {}
        for axis in reversed(AXES):
            rank, coordinates[axis] = divmod(rank, self.sizes[axis])
        return coordinates

    def rank_of(self, **coordinates):
        """The world rank at ``coordinates`` (axes not given: this rank's own)."""
        where = {**self.coordinates, **coordinates}
        rank = 0
        for axis in AXES:
            rank = rank * self.sizes[axis] + where[axis]
        return rank

    def _group(self, world, axes, name=None):
        colour = self.rank_of(**{axis: 0 for axis in axes})
        key = 0
        for axis in AXES:
            if axis in axes:
                key = key * self.sizes[axis] + self.coordinates[axis]
        return Group(world.Split(color=colour, key=key), name or axes[0])

    @property
    def rank(self):
        return self.world.rank

    @property
    def first_stage(self):
        return self.pp_rank == 0

    @property
    def last_stage(self):
        return self.pp_rank == self.pp_size - 1

    def __repr__(self):
        shape = " × ".join(f"{axis} {self.sizes[axis]}" for axis in AXES if axis in ("dp", "tp") or self.sizes[axis] > 1)
        place = ", ".join(f"{axis}_rank {self.coordinates[axis]}" for axis in reversed(AXES)
                          if axis in ("dp", "tp") or self.sizes[axis] > 1)
        if self.ep_size > 1:
            shape += f" (dp = expert-dp {self.dp_size // self.ep_size} × ep {self.ep_size})"
            place += f", ep_rank {self.ep_rank}"
        return f"Mesh(world {self.world.size} = {shape}; rank {self.rank} is {place})"


_meshes = {}  # sizes -> Mesh: init() reuses communicators rather than splitting new ones each call


def init(tp=1, dp=None, pp=1, cp=1, checked=None, ep=1):
    """The process mesh for ``tp`` × ``dp`` ranks, ready to use: call it first, on every rank, and pass
    its groups (``mesh.tp``, ``mesh.dp``) to every parallel layer and operator -- there is no global
    default, so each call shows which ranks talk.

    Also installs the abort handler (an exception on one rank ends the job) and, when ranks on this
    node share its cores, limits each rank's BLAS to its share of them. Calling it again with the same
    sizes returns the same mesh. ``checked=True`` turns on checked mode (``checks.py``: every collective
    first verifies that the ranks agree on shape and dtype); None leaves it as it is. ``ep``: expert
    parallelism, carved out of dp (``Mesh``).
    """
    install_abort_handler()
    if checked is not None:
        set_checked(checked)
    key = (tp, dp, pp, cp) if ep == 1 else (tp, dp, pp, cp, ep)
    if key not in _meshes:
        _meshes[key] = Mesh(tp, dp, pp, cp, ep)
        _limit_blas_threads()
    return _meshes[key]
