# escape=`

FROM mcr.microsoft.com/windows/servercore:ltsc2022
SHELL ["powershell", "-Command", "$ErrorActionPreference = 'Stop';"]
RUN New-Item -ItemType Directory C:\Example; `
    Write-Host done
COPY testfile.txt c:\
ENV DATA_PATH C:\data
HEALTHCHECK NONE
