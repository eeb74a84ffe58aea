from torchcore.cli import main

raise SystemExit(main())
