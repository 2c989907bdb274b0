from eftmesh.logit.server import main

main()
