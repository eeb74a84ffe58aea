from torchcore.commands import main

raise SystemExit(main())
