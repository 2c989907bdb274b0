from eftmesh.combiner.server import main

main()
